import os
import time

import pytest

from storage.files import TEMP_PREFIX, FileStore, StorageFullError, write_text_durably
from storage.uids import InvalidUIDError


def test_write_is_atomic_and_leaves_no_temporary(tmp_path):
    store = FileStore(tmp_path)
    path = store.path_for("1.2.3", "1.2.3.4", "1.2.3.4.5")
    store.write(path, [b"abc", b"def"])
    assert path.read_bytes() == b"abcdef"
    assert path == tmp_path / "1.2.3" / "1.2.3.4" / "1.2.3.4.5.dcm"
    assert [p.name for p in path.parent.iterdir()] == ["1.2.3.4.5.dcm"]


def test_failed_write_leaves_nothing(tmp_path):
    store = FileStore(tmp_path)
    path = store.path_for("1.2.3", "1.2.3.4", "1.2.3.4.5")

    def chunks():
        yield b"partial"
        raise OSError("disk went away")

    with pytest.raises(OSError, match="disk went away"):
        store.write(path, chunks())  # type: ignore[arg-type]
    assert not path.exists()
    assert list(path.parent.iterdir()) == []


def test_path_refuses_what_is_not_a_uid(tmp_path):
    store = FileStore(tmp_path)
    with pytest.raises(InvalidUIDError, match="StudyInstanceUID"):
        store.path_for("../../etc", "1.2", "1.2.3")


def test_stale_temporaries_are_removed_at_start(tmp_path):
    store = FileStore(tmp_path)
    folder = tmp_path / "1.2" / "1.2.3"
    folder.mkdir(parents=True)
    (folder / f"{TEMP_PREFIX}abc.tmp").write_bytes(b"half an instance")
    (folder / "1.2.3.4.dcm").write_bytes(b"kept")
    assert store.remove_stale_temporaries() == 1
    assert [p.name for p in folder.iterdir()] == ["1.2.3.4.dcm"]


def test_a_restarted_worker_leaves_the_live_workers_temporaries_alone(tmp_path):
    """The supervisor cleans up after a dead worker while the others receive: only old temporaries go."""
    store = FileStore(tmp_path)
    folder = tmp_path / "1.2" / "1.2.3"
    folder.mkdir(parents=True)
    old, live = folder / f"{TEMP_PREFIX}old.tmp", folder / f"{TEMP_PREFIX}live.tmp"
    old.write_bytes(b"the dead worker's")
    live.write_bytes(b"being written")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert store.remove_stale_temporaries(older_than_s=300) == 1
    assert not old.exists() and live.exists()


def test_watermark_refuses_when_disk_is_short(tmp_path):
    free = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize
    with pytest.raises(StorageFullError, match="watermark"):
        FileStore(tmp_path, min_free_bytes=free + 2**40).check_free_space()
    FileStore(tmp_path, min_free_bytes=0).check_free_space()


def test_a_folder_another_writer_created_is_made_durable_before_a_file_lands_in_it(tmp_path, monkeypatch):
    """Another worker process (or thread) may have created the series folder and not yet fsync'd the study
    folder when this store's instance is written and acknowledged: the folder existing is not enough."""
    import storage.files

    synced: list = []
    monkeypatch.setattr(storage.files, "fsync_dir", lambda folder: synced.append(folder))
    store = FileStore(tmp_path)
    (tmp_path / "1.2" / "1.2.3").mkdir(parents=True)  # created elsewhere, its entries not yet fsync'd
    store.write(store.path_for("1.2", "1.2.3", "1.2.3.4"), [b"first"])
    assert synced == [tmp_path / "1.2", tmp_path, tmp_path / "1.2" / "1.2.3"]  # both entries, then the file's
    synced.clear()
    store.write(store.path_for("1.2", "1.2.3", "1.2.3.5"), [b"second"])
    store.write(store.path_for("1.2", "1.2.4", "1.2.4.1"), [b"another series"])
    # once per folder: the second instance syncs only its own entry; a new series only up to the known study
    assert synced == [tmp_path / "1.2" / "1.2.3", tmp_path / "1.2", tmp_path / "1.2" / "1.2.4"]


def test_a_card_rewritten_durably_is_the_old_or_the_new_never_a_part(tmp_path):
    """Model cards mark a training step as done: one cut off mid-write was trusted by a resumed run, then
    failed every later step. A write that fails leaves the old card and no temporary file."""
    card = tmp_path / "model_card.json"
    write_text_durably(card, '{"version": "1"}')
    with pytest.raises(UnicodeEncodeError):
        write_text_durably(card, '{"version": "2", "note": "\udc80"}')  # fails part-way through the write
    assert card.read_text() == '{"version": "1"}' and sorted(p.name for p in tmp_path.iterdir()) == [card.name]
    write_text_durably(card, '{"version": "2"}')
    assert card.read_text() == '{"version": "2"}' and sorted(p.name for p in tmp_path.iterdir()) == [card.name]
