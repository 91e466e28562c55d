"""Start-up recovery: make the file store and the index agree again after a crash.

A crash can interrupt a C-STORE at two points. Before the rename, it leaves a temporary file: never
acknowledged, deleted. Between the rename and the index commit, it leaves a complete, fsync'd file with no
row: also never acknowledged, but intact, so it is indexed (the sender will resend it; the resend is then a
duplicate). Only series folders modified around or after the newest indexed arrival can hold such files, so
recovery looks at those and not at the whole store.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import NamedTuple

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_node.header import read_elements
from dicom_node.ingest import InvalidInstanceError, read_header, to_record
from storage.files import FileStore
from storage.index import AddResult, IndexWriter
from storage.models import Instance

logger = logging.getLogger(__name__)

SAFETY_MARGIN = timedelta(minutes=10)
_SOURCE_AE = 0x00020016  # Source Application Entity Title: the sender, as the receiver wrote it


class Recovered(NamedTuple):
    """What recovery did: temporaries deleted, orphans indexed, orphans removed for a conflicting UID."""

    deleted: int
    indexed: int
    conflicting: int


def recover(files: FileStore, sessions: sessionmaker[Session], writer: IndexWriter) -> Recovered:
    """Delete stale temporaries and index orphaned instance files."""
    deleted = files.remove_stale_temporaries()
    with sessions() as session:
        newest = session.scalar(select(func.max(Instance.received_at)))
    since = (_as_utc(newest) - SAFETY_MARGIN).timestamp() if newest else 0.0
    outcomes: list[AddResult] = []
    for folder in _series_folders_modified_since(files.root, since):
        with sessions() as session:
            known = set(session.scalars(select(Instance.path).where(Instance.path.like(f"{files.relative(folder)}/%"))))
        for path in folder.glob("*.dcm"):
            if files.relative(path) not in known and (outcome := _index_orphan(files, writer, path)) is not None:
                outcomes.append(outcome)
    result = Recovered(deleted, outcomes.count(AddResult.NEW), outcomes.count(AddResult.CONFLICT))
    if any(result):
        logger.warning("recovery: removed %d partial temporary files, indexed %d unindexed instances, removed %d "
                       "whose SOP Instance UID is indexed elsewhere", *result)
    return result


def _series_folders_modified_since(root: Path, since: float) -> list[Path]:
    folders = []
    for study in os.scandir(root):
        if not study.is_dir():
            continue
        for series in os.scandir(study.path):
            if series.is_dir() and series.stat().st_mtime >= since:
                folders.append(Path(series.path))
    return folders


def _index_orphan(files: FileStore, writer: IndexWriter, path: Path) -> AddResult | None:
    """Index one unindexed file; a file whose UID is indexed elsewhere was never acknowledged: removed."""
    raw = path.read_bytes()
    try:
        meta_end = 144 + struct.unpack_from("<I", raw, 140)[0]
        meta = read_elements(memoryview(raw)[132:meta_end], frozenset({0x00020010, _SOURCE_AE}), explicit_vr=True)
        syntax = meta[0x00020010].rstrip(b"\x00 ").decode("ascii")
        source_ae = meta.get(_SOURCE_AE, b"").decode("ascii", "replace").strip(" \x00")[:16]
        header = read_header(raw[:meta_end], raw[meta_end:], syntax)
        arrived = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc).replace(tzinfo=None)  # naive UTC
        record = to_record(header, syntax, source_ae, arrived)
        if files.path_for(record.study_instance_uid, record.series_instance_uid, record.sop_instance_uid) != path:
            raise InvalidInstanceError(0, "file is not where its UIDs say it belongs")
    except (InvalidInstanceError, struct.error, ValueError, KeyError) as exc:
        logger.error("recovery: %s is not a valid instance file (%s); left in place for inspection", path, exc)
        return None
    outcome = writer.commit(replace(record, path=files.relative(path), size_bytes=len(raw)), None)
    if outcome is AddResult.CONFLICT:
        files.remove(path)
    return outcome


def _as_utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
