"""Stable UIDs for what the node writes: the same source series, model version and object kind always give
the same UID, so a resend or a re-run replaces the object in the PACS instead of adding a second one."""

from __future__ import annotations

import hashlib


def stable_uid(*parts: str) -> str:
    """A UUID-derived UID (2.25.<128-bit integer>, PS3.5 B.2) from a hash of ``parts``; at most 44 characters."""
    digest = hashlib.sha256("\x1f".join(("dicom-node", *parts)).encode("utf-8")).digest()
    return f"2.25.{int.from_bytes(digest[:16], 'big')}"


def output_uids(source_series_uid: str, model_version: str, kind: str) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of the ``kind`` ("SEG" or "SR") object for a source series."""
    return (stable_uid(source_series_uid, model_version, kind, "series"),
            stable_uid(source_series_uid, model_version, kind, "instance"))
