"""What a hostile or broken peer must not do to the node: reserve its memory, abort its associations, crash
its handlers or misfile its instances (and what start-up recovery must make of such leftovers)."""

import resource
import shutil
import socket
import struct
import sys
import threading
import warnings
import zlib
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from dicom_node import status
from dicom_node.ingest import InvalidInstanceError, _read_header_pydicom, file_meta_bytes, read_header
from dicom_node.receive import InstanceReceiver, StoreRequest
from dicom_node.recovery import recover
from storage.files import FileStore
from storage.models import Instance
from tests.dcmtk import echoscu, storescu_verbose
from tests.realfiles import real_file
from tests.test_index import writer
from tests.test_ingest import split_part10

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
DEFLATED = "1.2.840.10008.1.2.1.99"


def receiver_for(tmp_path):
    index, sessions = writer(tmp_path)
    return InstanceReceiver(FileStore(tmp_path / "files"), sessions, index), sessions


def ct_request(folder: Path, calling_ae: str = "CT1", **changes: str) -> StoreRequest:
    """CT_small.dcm as a C-STORE request, with ``changes`` (keyword: value) made to its data set."""
    ds = dcmread(real_file("CT_small.dcm"))
    for keyword, value in changes.items():
        setattr(ds, keyword, value)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    path = folder / f"{ds.SOPInstanceUID}-{ds.StudyInstanceUID}.dcm"
    ds.save_as(path)
    _, dataset, syntax = split_part10(path)
    return StoreRequest(str(ds.SOPClassUID), str(ds.SOPInstanceUID), syntax, calling_ae, dataset)


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kibibytes


def test_a_pdu_claiming_4_gib_neither_reserves_it_nor_stops_the_node(running_node):
    before = max_rss_bytes()
    with socket.create_connection(("127.0.0.1", running_node.port), timeout=30) as peer:
        peer.sendall(b"\x01\x00\xff\xff\xff\xff")  # an A-ASSOCIATE-RQ "of 4 GiB", before any AE title check
        try:
            closed = peer.recv(1024) == b""
        except ConnectionResetError:
            closed = True
        except TimeoutError:
            closed = False
    assert max_rss_bytes() - before < 500 * 2**20
    assert closed, "the node kept waiting for the 4 GiB"
    assert echoscu(running_node.port, "ECHOSCU").returncode == 0


def test_a_non_ascii_sop_instance_uid_gets_a_failure_status_not_an_abort(running_node, ct_series, tmp_path):
    ds = dcmread(ct_series[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4\xe9"
    bad = tmp_path / "latin1_uid.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(bad)
    outcome = storescu_verbose(running_node.port, [bad])
    assert outcome.statuses == {str(bad): "Error: CannotUnderstand"}  # DCMTK's name for any 0xCxxx status
    assert "Peer Aborted" not in outcome.process.stdout + outcome.process.stderr
    assert storescu_verbose(running_node.port, [ct_series[1]]).succeeded() == [str(ct_series[1])]
    assert [r.sop_instance_uid for r in running_node.instances()] == [dcmread(ct_series[1]).SOPInstanceUID]


def _element(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    value += b"\x00" * (len(value) % 2)
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def test_a_truncated_data_set_is_told_from_a_whole_one_by_parallel_associations():
    """The pydicom path detects truncation from a warning; concurrent calls must each see only their own."""
    meta = file_meta_bytes(CT_IMAGE, "1.2.3.4", EXPLICIT_LE, "X")
    uids = _element(0x0008, 0x0016, b"UI", CT_IMAGE.encode()) + _element(0x0008, 0x0018, b"UI", b"1.2.3.4")
    undefined = struct.pack("<HH2sHI", 0x0009, 0x1010, b"OB", 0, 0xFFFFFFFF) + b"\x01" * 64
    truncated = meta + uids + undefined  # the sequence delimiter never comes
    whole = truncated + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0) + _element(0x0020, 0x000D, b"UI", b"1.2.3")
    filters_before = list(warnings.filters)
    misjudged = []

    def parse(data: bytes, is_truncated: bool) -> None:
        for _ in range(100):
            try:
                _read_header_pydicom(data)
                refused = False
            except InvalidInstanceError:
                refused = True
            if refused != is_truncated:
                misjudged.append("whole refused" if refused else "truncated accepted")

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # interleave the threads as many cores would
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's own warnings about the truncated file
            threads = [threading.Thread(target=parse, args=(truncated, True) if i % 2 else (whole, False)) for i in range(6)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            filters_inside = list(warnings.filters)
    finally:
        sys.setswitchinterval(interval)
    assert misjudged == []
    assert filters_inside[0][0] == "ignore" and list(warnings.filters) == filters_before  # state left as found


def test_recovery_keeps_the_senders_ae_title_and_removes_a_conflicting_orphan(tmp_path):
    receiver, sessions = receiver_for(tmp_path)
    files = receiver.files
    first = ct_request(tmp_path, "MODALITY1")
    other_series = ct_request(tmp_path, "MODALITY1", SOPInstanceUID="1.2.3.4.5.7", SeriesInstanceUID="1.2.3.4.5.8")
    assert receiver.receive(first) == status.SUCCESS and receiver.receive(other_series) == status.SUCCESS
    ds = dcmread(real_file("CT_small.dcm"))
    stored = files.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    # A crash between rename and commit: a complete file, sent by MODALITY1, with no row.
    orphan = dcmread(stored)
    orphan.SOPInstanceUID = orphan.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6"
    orphan.save_as(stored.parent / "1.2.3.4.5.6.dcm")
    # A file whose SOP Instance UID is indexed in another series (never acknowledged: the index refuses it).
    conflicting = dcmread(stored)
    conflicting.SeriesInstanceUID = "1.2.3.4.5.8"
    conflicting_path = files.path_for(ds.StudyInstanceUID, "1.2.3.4.5.8", ds.SOPInstanceUID)
    conflicting.save_as(conflicting_path)

    recovered = recover(files, sessions, receiver.writer)

    with sessions() as session:
        rows = {i.sop_instance_uid: i for i in session.scalars(select(Instance))}
    assert set(rows) == {ds.SOPInstanceUID, "1.2.3.4.5.6", "1.2.3.4.5.7"}
    assert rows["1.2.3.4.5.6"].calling_ae_title == "MODALITY1"
    assert rows[ds.SOPInstanceUID].path == files.relative(stored)
    assert not conflicting_path.exists()
    assert (recovered.indexed, recovered.conflicting) == (1, 1)


def test_a_resend_under_another_study_is_a_conflict_even_where_a_stale_file_lies(tmp_path):
    receiver, sessions = receiver_for(tmp_path)
    assert receiver.receive(ct_request(tmp_path)) == status.SUCCESS
    moved = ct_request(tmp_path, StudyInstanceUID="1.2.3.4.9")
    ds = dcmread(real_file("CT_small.dcm"))
    stale = receiver.files.path_for("1.2.3.4.9", ds.SeriesInstanceUID, ds.SOPInstanceUID)
    stale.parent.mkdir(parents=True)
    shutil.copy(receiver.files.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID), stale)

    assert receiver.receive(moved) == status.UID_CONFLICT
    assert not stale.exists()
    with sessions() as session:
        assert session.scalar(select(Instance.path)) == receiver.files.relative(
            receiver.files.path_for(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID))


def test_arrival_times_are_naive_utc_like_every_other_time_in_the_index(tmp_path):
    receiver, sessions = receiver_for(tmp_path)
    real_commit, committed = receiver.writer.commit, []

    def commit(record, folder):  # see what the database is given (SQLite drops a time zone; PostgreSQL shifts it)
        committed.append(record.received_at)
        return real_commit(record, folder)

    receiver.writer.commit = commit
    assert receiver.receive(ct_request(tmp_path)) == status.SUCCESS
    utc_now = datetime.now(timezone.utc).replace(tzinfo=None)
    assert committed[0].tzinfo is None
    assert abs(committed[0] - utc_now) < timedelta(minutes=1)


def _nested_sequences(depth: int) -> bytes:
    opening = (struct.pack("<HH2sHI", 0x0008, 0x1115, b"SQ", 0, 0xFFFFFFFF)
               + struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF))
    closing = struct.pack("<HHI", 0xFFFE, 0xE00D, 0) + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    return opening * depth + closing * depth


def _deflated(data: bytes) -> bytes:
    packer = zlib.compressobj(wbits=-15)  # PS3.5 A.5: raw deflate
    return packer.compress(data) + packer.flush()


@pytest.mark.parametrize(("syntax", "encode"), [(EXPLICIT_LE, bytes), (DEFLATED, _deflated)])
def test_deeply_nested_sequences_get_cannot_understand(tmp_path, syntax, encode):
    """The header reader and pydicom (deflate's path) both recurse per level of nesting."""
    uid = "1.2.3.4.5.6"
    dataset = encode(_element(0x0008, 0x0016, b"UI", CT_IMAGE.encode()) + _element(0x0008, 0x0018, b"UI", uid.encode())
                     + _nested_sequences(600))
    with pytest.raises(InvalidInstanceError, match="cannot be parsed") as info:
        read_header(file_meta_bytes(CT_IMAGE, uid, syntax, "X"), dataset, syntax)
    assert info.value.status == status.CANNOT_UNDERSTAND
    receiver, _ = receiver_for(tmp_path)
    assert receiver.receive(StoreRequest(CT_IMAGE, uid, syntax, "CT1", dataset)) == status.CANNOT_UNDERSTAND


def test_a_few_nested_sequences_are_still_skipped():
    uid = "1.2.3.4.5.6"
    dataset = (_element(0x0008, 0x0016, b"UI", CT_IMAGE.encode()) + _nested_sequences(20)
               + _element(0x0020, 0x000D, b"UI", b"1.2.3"))
    header = read_header(file_meta_bytes(CT_IMAGE, uid, EXPLICIT_LE, "X"), dataset, EXPLICIT_LE)
    assert header["StudyInstanceUID"] == "1.2.3"
