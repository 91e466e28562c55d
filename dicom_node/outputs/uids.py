"""Stable UIDs for what the node writes: the same source series, model version and object kind always give
the same UID, so a resend or a re-run replaces the object in the PACS instead of adding a second one."""

from __future__ import annotations

import uuid

NAMESPACE = uuid.UUID("6f0c8d9e-3a51-5b7e-9c2d-dc0de0000001")


def stable_uid(*parts: str) -> str:
    """A UUID-derived UID (2.25.<name-based UUID, version 5>, PS3.5 B.2) of ``parts``; at most 44 characters."""
    return f"2.25.{uuid.uuid5(NAMESPACE, chr(31).join(parts)).int}"


def output_uids(source_series_uid: str, model_version: str, kind: str, run: int = 1) -> tuple[str, str]:
    """(Series Instance UID, SOP Instance UID) of the ``kind`` ("SEG" or "SR") object for a source series.

    ``run`` counts interpretations of the series (a re-run after late arrivals is run 2): a new run is a new
    object, never an overwrite of what a radiologist may already have read; a retry of a run is the same one.
    """
    return (stable_uid(source_series_uid, model_version, kind, "series", *_run(run)),
            stable_uid(source_series_uid, model_version, kind, "instance", *_run(run)))


def tracking_uid(source_series_uid: str, model_version: str, segment_number: int, run: int = 1) -> str:
    """The Tracking UID of the lesion in SEG segment ``segment_number``, shared by the SEG and the SR's measurement
    group (TID 1500 readers link the two by it). Another model version or run is another finding; run 1 keeps the
    parts the SEG has always used, so SEGs already sent keep their UIDs."""
    return stable_uid(source_series_uid, model_version, "SEG", "segment", str(segment_number), *_run(run))


def statement_uid(source_series_uid: str, model_version: str, statement: str, run: int = 1) -> str:
    """The Tracking UID of the SR's group that says "No findings" or "Not assessed: ...": like a lesion's, another
    model version or run is another observation (one UID for all of them told trackers it was one finding)."""
    return stable_uid(source_series_uid, model_version, "SR", "statement", statement, *_run(run))


def _run(run: int) -> tuple[str, ...]:
    """Run 1 adds nothing: the UIDs of objects sent before runs were counted stay as they were."""
    return () if run == 1 else (f"run {run}",)
