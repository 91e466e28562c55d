"""Writing to the index, with group commit (see :class:`IndexWriter`): no C-STORE success is sent before
its row is committed, and concurrent associations share the folder fsyncs and the commits."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from pathlib import Path

from typing import Any

from sqlalchemy import Connection, Engine, bindparam, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from storage.files import FileStore
from storage.models import Instance, Patient, Series, Study

logger = logging.getLogger(__name__)

MAX_BATCH = 256


@dataclass(frozen=True)
class InstanceRecord:
    """The header fields the index keeps for one stored instance (DICOM keywords, snake_case)."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    transfer_syntax_uid: str
    path: str
    size_bytes: int
    received_at: datetime
    calling_ae_title: str = ""
    patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    study_date: str = ""
    study_time: str = ""
    accession_number: str = ""
    study_id: str = ""
    study_description: str = ""
    referring_physician_name: str = ""
    modality: str = ""
    series_number: int | None = None
    series_description: str = ""
    body_part_examined: str = ""
    frame_of_reference_uid: str = ""
    instance_number: int | None = None
    number_of_frames: int = 1


class AddResult(Enum):
    NEW = "new"
    DUPLICATE = "duplicate"  # same SOP Instance UID already indexed at the same place
    CONFLICT = "conflict"  # same SOP Instance UID already indexed under another study or series


@dataclass
class _Pending:
    record: InstanceRecord
    folder: Path | None
    done: bool = False
    result: AddResult | None = None
    error: Exception | None = None


class IndexWriter:
    """The process's one writer of instance rows: leader-based group commit.

    A caller queues its record and takes the commit lock. Whoever holds it (the leader) fsyncs the folders
    of everything queued, commits all those rows in one transaction and marks them done; a caller that gets
    the lock and finds its record done returns at once. Concurrent associations share fsyncs and commits,
    and a lone association commits on its own thread, with no hand-off to another.
    """

    def __init__(self, engine: Engine, files: FileStore) -> None:
        self._engine = engine
        self._files = files
        self._inserter = InstanceInserter()
        self._queue: list[_Pending] = []
        self._queue_lock = threading.Lock()
        self._commit_lock = threading.Lock()

    def commit(self, record: InstanceRecord, folder_to_sync: Path | None) -> AddResult:
        """Make the instance durable in the index (after fsyncing ``folder_to_sync``)."""
        item = _Pending(record, folder_to_sync)
        with self._queue_lock:
            self._queue.append(item)
        while not item.done:
            with self._commit_lock:
                if not item.done:
                    with self._queue_lock:
                        batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                    self._commit_batch(batch)
        if item.error is not None:
            raise item.error
        assert item.result is not None
        return item.result

    def _commit_batch(self, batch: list[_Pending]) -> None:
        try:
            self._files.sync_dirs({item.folder for item in batch if item.folder is not None})
            with self._engine.begin() as connection:
                results = [self._inserter.add(connection, item.record) for item in batch]
                latest: dict[str, datetime] = {}
                for item, result in zip(batch, results):
                    if result is AddResult.NEW:
                        latest[item.record.series_instance_uid] = item.record.received_at
                for series_uid, received_at in latest.items():
                    self._inserter.touch_series(connection, series_uid, received_at)
        except Exception:
            self._inserter.forget()  # a rolled-back series insert must not stay cached
            if len(batch) == 1:
                # No traceback: the database's message would carry bound values (patient names and IDs).
                logger.error("index commit failed for SOP Instance %s", batch[0].record.sop_instance_uid)
                batch[0].error = IndexWriteError(batch[0].record.sop_instance_uid)
                batch[0].done = True
                return
            # One bad row must not fail its neighbours: retry them one by one.
            for item in batch:
                self._commit_batch([item])
            return
        for item, result in zip(batch, results):
            item.result, item.done = result, True


class IndexWriteError(RuntimeError):
    def __init__(self, sop_instance_uid: str) -> None:
        super().__init__(f"could not index SOP Instance {sop_instance_uid}")


# Statements built once: building a statement per call cost more than executing it.
_SELECT_INSTANCE_PATH = select(Instance.path).where(Instance.sop_instance_uid == bindparam("uid"))
_SELECT_SERIES = select(Series.id).where(Series.series_instance_uid == bindparam("uid"))
_SELECT_STUDY = select(Study.id).where(Study.study_instance_uid == bindparam("uid"))
# A patient is (PatientID, PatientName): an empty or reused ID must not merge two people's studies.
_SELECT_PATIENT = select(Patient.id).where(Patient.patient_id == bindparam("uid"), Patient.patient_name == bindparam("name"))
_TOUCH_SERIES = (
    update(Series).where(Series.series_instance_uid == bindparam("uid")).values(last_received_at=bindparam("at"))
)


class InstanceInserter:
    """Inserts instance rows with prepared Core statements and a cache of series keys.

    The ORM's unit of work cost about 2.4 ms per instance here, more than the fsync; prepared INSERTs cost
    a tenth of that. The cache maps SeriesInstanceUID to its primary key; it is only valid because the
    index writer is the one process-wide writer of series rows.
    """

    def __init__(self) -> None:
        self._series_keys: dict[str, int] = {}

    def forget(self) -> None:
        self._series_keys.clear()

    def add(self, connection: Connection, record: InstanceRecord) -> AddResult:
        """Insert the instance and its patient, study and series rows where missing.

        The INSERT is ON CONFLICT DO NOTHING, so two workers storing the same instance at once cannot both
        insert it. Whether it inserted is read from RETURNING: PostgreSQL's rowcount is -1 there.
        """
        existing = connection.execute(_SELECT_INSTANCE_PATH, {"uid": record.sop_instance_uid}).scalar()
        if existing is None:  # checked first: a refused instance must not leave patient/study/series rows
            fields = dict(vars(record))  # shallow: dataclasses.asdict deep-copies every value
            row = {"series_fk": self._series_key(connection, record, fields), **_pick(fields, Instance)}
            if connection.execute(_insert_if_new(connection, Instance), row).scalar() is not None:
                return AddResult.NEW
            existing = connection.execute(_SELECT_INSTANCE_PATH, {"uid": record.sop_instance_uid}).scalar()
        return AddResult.DUPLICATE if existing == record.path else AddResult.CONFLICT

    def touch_series(self, connection: Connection, series_uid: str, received_at: datetime) -> None:
        """Record the latest arrival in a series (what completion detection waits on)."""
        connection.execute(_TOUCH_SERIES, {"uid": series_uid, "at": received_at})

    def _series_key(self, connection: Connection, record: InstanceRecord, fields: dict[str, Any]) -> int:
        uid = record.series_instance_uid
        key = self._series_keys.get(uid)
        if key is None:
            key = connection.execute(_SELECT_SERIES, {"uid": uid}).scalar()
        if key is None:
            patient_key = _get_or_insert(connection, _SELECT_PATIENT, {"uid": record.patient_id, "name": record.patient_name},
                                         Patient, _pick(fields, Patient))
            study_values = {"patient_fk": patient_key, **_pick(fields, Study)}
            study_key = _get_or_insert(connection, _SELECT_STUDY, {"uid": record.study_instance_uid}, Study, study_values)
            values = _pick(fields, Series) | {"study_fk": study_key, "first_received_at": record.received_at}
            key = _get_or_insert(connection, _SELECT_SERIES, {"uid": uid}, Series, values)
        self._series_keys[uid] = key
        return key


# Each row's unique key. Patient, study and series rows are inserted ON CONFLICT DO NOTHING too: two worker
# processes may create the same one at once, and on PostgreSQL the second failed on the unique key.
_UNIQUE_KEYS: dict[type, list[str]] = {
    Patient: ["patient_id", "patient_name"],
    Study: ["study_instance_uid"],
    Series: ["series_instance_uid"],
    Instance: ["sop_instance_uid"],
}
_INSERT_IF_NEW = {
    (name, model): dialect.insert(model).on_conflict_do_nothing(index_elements=keys).returning(model.id)  # type: ignore[attr-defined]
    for name, dialect in (("sqlite", sqlite), ("postgresql", postgresql))
    for model, keys in _UNIQUE_KEYS.items()
}


def _insert_if_new(connection: Connection, model: type) -> Any:
    """The INSERT ... ON CONFLICT DO NOTHING RETURNING id of ``model`` for this connection's database."""
    try:
        return _INSERT_IF_NEW[connection.dialect.name, model]
    except KeyError:
        raise NotImplementedError(f"index database {connection.dialect.name!r}: use SQLite or PostgreSQL") from None


def _get_or_insert(connection: Connection, query: Any, keys: dict[str, str], model: type, values: dict[str, Any]) -> int:
    """The row's primary key, inserting the row if missing (or reading the one another worker just inserted)."""
    key = connection.execute(query, keys).scalar()
    if key is None:
        key = connection.execute(_insert_if_new(connection, model), values).scalar()
    if key is None:  # another worker process inserted it since our SELECT
        key = connection.execute(query, keys).scalar_one()
    return key


def indexed_path(session: Session, sop_instance_uid: str) -> str | None:
    """Where the index has the instance (relative to the store), or None."""
    return session.execute(_SELECT_INSTANCE_PATH, {"uid": sop_instance_uid}).scalar()


def is_indexed(session: Session, sop_instance_uid: str) -> bool:
    return indexed_path(session, sop_instance_uid) is not None


def _pick(fields: dict[str, Any], model: type) -> dict[str, Any]:
    columns = {c.key for c in model.__table__.columns} - {"id"}  # type: ignore[attr-defined]
    picked = {k: v for k, v in fields.items() if k in columns}
    if model is Series:
        picked["last_received_at"] = fields["received_at"]
    return picked
