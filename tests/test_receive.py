"""Two associations storing one instance at once (a sender that timed out and resent): the one told
SUCCESS must find its file on disk, whatever happened to the other."""

import threading

from pydicom import dcmread

from dicom_node import status
from dicom_node.receive import InstanceReceiver, StoreRequest
from storage.files import FileStore
from storage.index import IndexWriteError, is_indexed
from tests.realfiles import real_file
from tests.test_index import writer
from tests.test_ingest import split_part10


def test_a_failed_store_never_deletes_the_file_a_concurrent_store_of_the_same_instance_was_acknowledged_for(tmp_path):
    index, sessions = writer(tmp_path)
    files = FileStore(tmp_path / "files")  # the writer's own store
    receiver = InstanceReceiver(files, sessions, index)
    ds = dcmread(real_file("CT_small.dcm"), stop_before_pixels=True)
    _, dataset, syntax = split_part10(real_file("CT_small.dcm"))
    request = StoreRequest(str(ds.SOPClassUID), str(ds.SOPInstanceUID), syntax, "CT1", dataset)

    first_in_commit, release_first, first_done = threading.Event(), threading.Event(), threading.Event()
    real_commit, calls = index.commit, []

    def commit(record, folder):  # the first commit hits "database is locked"; the second waits until it has
        calls.append(record.sop_instance_uid)
        if len(calls) == 1:
            first_in_commit.set()
            release_first.wait(10)
            raise IndexWriteError(record.sop_instance_uid)
        first_done.wait(10)
        return real_commit(record, folder)

    index.commit = commit
    answers = {}
    first = threading.Thread(target=lambda: answers.setdefault("first", receiver.receive(request)))
    second = threading.Thread(target=lambda: answers.setdefault("second", receiver.receive(request)))
    first.start()
    assert first_in_commit.wait(10)
    second.start()
    second.join(0.5)  # time for the second to overwrite the file, had it not waited for the first
    release_first.set()
    first.join(10)
    first_done.set()
    second.join(10)

    assert answers == {"first": status.OUT_OF_RESOURCES, "second": status.SUCCESS}
    path = files.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert path.is_file() and path.read_bytes().endswith(dataset)  # the acknowledged instance is on disk
    with sessions() as session:
        assert is_indexed(session, str(ds.SOPInstanceUID))
