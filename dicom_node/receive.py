"""Receiving one instance: validate, write durably, index, and say which DIMSE status to answer.

Kept free of pynetdicom so that it can be called (and tested) with plain bytes. The order is what makes a
success trustworthy: the file is fsync'd and renamed, its folder fsync'd and its row committed before
:meth:`InstanceReceiver.receive` returns SUCCESS; on any failure nothing is left behind.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import status
from dicom_node.ingest import InvalidInstanceError, file_meta_bytes, read_header, to_record
from storage.files import FileStore, StorageFullError
from storage.index import AddResult, IndexWriteError, IndexWriter, indexed_path
from storage.models import now_utc
from storage.uids import InvalidUIDError, validate_uid

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoreRequest:
    """What arrived in one C-STORE: the command's UIDs, the accepted transfer syntax and the raw data set."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    calling_ae_title: str
    dataset: bytes


class InstanceReceiver:
    """Turns C-STORE requests into durable files and index rows."""

    def __init__(self, files: FileStore, sessions: sessionmaker[Session], writer: IndexWriter) -> None:
        self.files = files
        self.sessions = sessions
        self.writer = writer

    def receive(self, request: StoreRequest) -> int:
        """Store one instance and return the DIMSE status for the C-STORE response."""
        try:
            return self._receive(request)
        except InvalidInstanceError as exc:
            logger.warning("refused instance %s from %s: %s", _safe(request.sop_instance_uid), request.calling_ae_title, exc)
            return exc.status
        except StorageFullError as exc:
            logger.error("refused instance %s: %s", _safe(request.sop_instance_uid), exc)
            return status.OUT_OF_RESOURCES
        except (OSError, IndexWriteError, SQLAlchemyError) as exc:
            logger.error("could not store instance %s: %s", _safe(request.sop_instance_uid), type(exc).__name__)
            return status.OUT_OF_RESOURCES

    def _indexed_here(self, sop_uid: str, path: Path) -> bool:
        """Whether the instance is indexed at ``path`` (indexed elsewhere, a file at ``path`` is stale)."""
        with self.sessions() as session:
            return indexed_path(session, sop_uid) == self.files.relative(path)

    def _remove_unless_indexed(self, path: Path, sop_uid: str) -> None:
        """After a failed commit: remove the file, unless the row is there after all (a commit that failed
        after committing). Where the index cannot even be asked, the file stays: start-up recovery indexes a
        complete file whose commit was interrupted, and the sender, told to retry, gets a duplicate's success."""
        try:
            indexed = self._indexed_here(sop_uid, path)
        except SQLAlchemyError:
            return
        if not indexed:
            self.files.remove(path)

    def _receive(self, request: StoreRequest) -> int:
        self.files.check_free_space()
        try:
            sop_uid = validate_uid(request.sop_instance_uid, "Affected SOP Instance UID")
        except InvalidUIDError as exc:
            raise InvalidInstanceError(status.INVALID_UID, str(exc)) from None
        meta = file_meta_bytes(request.sop_class_uid, sop_uid, request.transfer_syntax_uid, request.calling_ae_title)
        header = read_header(meta, request.dataset, request.transfer_syntax_uid)
        record = to_record(header, request.transfer_syntax_uid, request.calling_ae_title, now_utc())
        if record.sop_instance_uid != sop_uid or record.sop_class_uid != request.sop_class_uid:
            raise InvalidInstanceError(
                status.DATASET_MISMATCH,
                "SOP Class/Instance UID in the data set differ from the C-STORE request's Affected SOP Class/Instance UID",
            )
        path = self.files.path_for(record.study_instance_uid, record.series_instance_uid, sop_uid)
        with self.files.instance_lock(sop_uid):  # another association may be storing this very instance
            if path.is_file() and self._indexed_here(sop_uid, path):
                logger.info("instance %s already stored; duplicate acknowledged", sop_uid)
                return status.SUCCESS
            folder = self.files.write(path, [meta, request.dataset], sync_dir=False)
            record = replace(record, path=self.files.relative(path), size_bytes=len(meta) + len(request.dataset))
            try:
                outcome = self.writer.commit(record, folder)
            except BaseException:
                self._remove_unless_indexed(path, sop_uid)
                raise
            if outcome is AddResult.CONFLICT:
                self.files.remove(path)
                raise InvalidInstanceError(
                    status.UID_CONFLICT, "SOP Instance UID is already stored under another study or series"
                )
        logger.debug("stored %s (%s) in series %s", sop_uid, record.modality, record.series_instance_uid)
        return status.SUCCESS


def _safe(value: str) -> str:
    """A UID for a log line: printable and bounded, whatever the sender put in it."""
    return repr(value[:80]) if not value.replace(".", "").isdigit() else value
