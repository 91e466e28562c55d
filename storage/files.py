"""The file store: the only code that writes instance files.

Layout: ``<root>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``, every UID validated.
A write goes to a temporary file in the destination folder, is fsync'd, renamed into place and the folder
is fsync'd, so after a crash a file is either complete at its final name or absent: a reader never sees a
partial instance. Folder fsyncs can be deferred to :meth:`FileStore.sync_dirs` so that a group of writes
shares one (group commit).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from storage.uids import validate_uid

TEMP_PREFIX = ".incoming-"
LOCK_FOLDER = ".locks"  # under the root; no UID starts with a dot
LOCK_STRIPES = 1024
MAX_DURABLE_FOLDERS = 100_000  # series and study folders remembered as fsync'd (a few MiB)


class StorageFullError(OSError):
    """Free space fell below the configured watermark; the node refuses new instances."""


class FileStore:
    """Atomic, fsync'd instance files under one root folder."""

    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = Path(root)
        self.min_free_bytes = min_free_bytes
        self.root.mkdir(parents=True, exist_ok=True)
        self._locks = self.root / LOCK_FOLDER
        self._locks.mkdir(exist_ok=True)
        # Folders whose entries this store has fsync'd: the only ones a write may skip _make_dirs' fsyncs for
        self._durable: set[Path] = set()
        self._durable_lock = threading.Lock()

    def path_for(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Final path of an instance; raises InvalidUIDError for a UID that is not one."""
        study = validate_uid(study_uid, "StudyInstanceUID")
        series = validate_uid(series_uid, "SeriesInstanceUID")
        sop = validate_uid(sop_uid, "SOPInstanceUID")
        return self.root / study / series / f"{sop}.dcm"

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def check_free_space(self) -> None:
        free = shutil.disk_usage(self.root).free
        if free < self.min_free_bytes:
            raise StorageFullError(
                f"only {free // 2**20} MiB free under {self.root}, below the {self.min_free_bytes // 2**20} MiB watermark"
            )

    def write(self, path: Path, chunks: list[bytes], sync_dir: bool = True) -> Path:
        """Write ``chunks`` to ``path`` atomically and durably; returns the folder still to fsync, if deferred.

        The temporary file lives in the destination folder so the rename never crosses file systems.
        """
        folder = path.parent
        self._make_dirs(folder)
        fd, tmp_name = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix=".tmp", dir=folder)
        try:
            with os.fdopen(fd, "wb", buffering=0) as fh:
                for chunk in chunks:
                    fh.write(chunk)
                os.fsync(fh.fileno())
            os.replace(tmp_name, path)
        except BaseException:
            _unlink_quietly(Path(tmp_name))
            raise
        if sync_dir:
            fsync_dir(folder)
        return folder

    @contextmanager
    def instance_lock(self, sop_uid: str) -> Iterator[None]:
        """Hold the advisory lock of this instance (one of LOCK_STRIPES files, chosen by its UID): two
        associations or worker processes storing the same instance take turns from the check for a stored
        copy to the commit, so one's cleanup never deletes the file the other was acknowledged for. Each call
        opens the file anew, so threads of one process exclude each other too (flock is per open file)."""
        with open(self._locks / f"{zlib.crc32(sop_uid.encode()) % LOCK_STRIPES:04d}.lock", "ab") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def sync_dirs(self, folders: set[Path]) -> None:
        for folder in folders:
            fsync_dir(folder)

    def remove(self, path: Path) -> None:
        _unlink_quietly(path)

    def remove_stale_temporaries(self, older_than_s: float = 0.0) -> int:
        """Delete temporary files left by a crash mid-write; they were never acknowledged. ``older_than_s``:
        only those last written that long ago, where other processes may be writing theirs right now."""
        count = 0
        cutoff = time.time() - older_than_s
        for tmp in self.root.glob(f"*/*/{TEMP_PREFIX}*"):
            try:
                if older_than_s and tmp.stat().st_mtime > cutoff:
                    continue
            except FileNotFoundError:  # renamed into place (or removed) meanwhile
                continue
            _unlink_quietly(tmp)
            count += 1
        return count

    def _make_dirs(self, folder: Path) -> None:
        """Create missing folders and fsync the parent of every level up to the root, so the folder itself
        survives a crash. A folder that exists is not proof of that: another thread or worker process may
        have created it and not yet fsync'd its parent, and an instance acknowledged into it meanwhile would
        vanish with it. So each store fsyncs a folder's chain once, whoever created it."""
        if folder in self._durable:
            return
        folder.mkdir(parents=True, exist_ok=True)
        synced = []
        current = folder
        while current != self.root and current.parent != current and current not in self._durable:
            fsync_dir(current.parent)
            synced.append(current)
            current = current.parent
        with self._durable_lock:
            if len(self._durable) >= MAX_DURABLE_FOLDERS:  # bounded memory on a node that runs for years
                self._durable.clear()
            self._durable.update(synced)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(temporary: Path, path: Path) -> None:
    """Move a fully written ``temporary`` (in ``path``'s folder) onto ``path``: after a crash or power cut
    ``path`` holds the old content or the new, never a partial file that a resumed run would trust."""
    with open(temporary, "rb") as fh:
        os.fsync(fh.fileno())
    temporary.replace(path)
    fsync_dir(path.parent)


def write_text_durably(path: Path, text: str) -> None:
    """``path.write_text(text)``, atomically and durably (model cards, which mark a step of a run as done)."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        temporary.write_text(text)
        replace_durably(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _unlink_quietly(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
