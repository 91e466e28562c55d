"""The SCP driven by real DCMTK clients over loopback."""

import threading
import warnings

import pytest
from pydicom import dcmread

from tests.dcmtk import echoscu, findscu, storescu_verbose
from tests.realfiles import real_dicom_files
from dicom_node.sop_classes import STORAGE_SOP_CLASSES
from storage.uids import is_valid_uid


def test_echo_from_a_configured_peer(running_node):
    result = echoscu(running_node.port, "ECHOSCU")
    assert result.returncode == 0, result.stderr


def test_unknown_calling_ae_is_rejected(running_node, caplog):
    result = echoscu(running_node.port, "INTRUDER")
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stdout + result.stderr
    assert "rejected association from 'INTRUDER'" in caplog.text


def test_peer_is_rejected_from_another_host(running_node):
    result = echoscu(running_node.port, "ELSEWHERE")  # configured for 127.0.0.2 only
    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stdout + result.stderr


def test_series_is_stored_durably_and_indexed(running_node, ct_series):
    outcome = storescu_verbose(running_node.port, ct_series)
    assert outcome.process.returncode == 0, outcome.process.stderr
    assert len(outcome.succeeded()) == len(ct_series)
    rows = running_node.instances()
    assert len(rows) == len(ct_series)
    for source in ct_series:
        sent = dcmread(source)
        row = next(r for r in rows if r.sop_instance_uid == sent.SOPInstanceUID)
        stored = dcmread(running_node.config.storage.path / row.path)
        assert stored.PixelData == sent.PixelData
        assert stored.file_meta.SourceApplicationEntityTitle == "STORESCU"
        assert row.series.series_instance_uid == sent.SeriesInstanceUID
        assert row.series.modality == "CT"
        assert row.series.study.patient.patient_id == "BENCH001"
    assert running_node.stray_files() == []


def test_second_copy_is_idempotent(running_node, ct_series):
    first = storescu_verbose(running_node.port, ct_series[:3])
    before = {p: p.read_bytes() for p in running_node.stored_files()}
    again = storescu_verbose(running_node.port, ct_series[:3])
    assert first.succeeded() and len(again.succeeded()) == 3
    assert len(running_node.instances()) == 3
    assert {p: p.read_bytes() for p in running_node.stored_files()} == before


def test_store_refused_to_a_peer_without_store_permission(running_node, ct_series):
    outcome = storescu_verbose(running_node.port, ct_series[:1], calling_ae="ECHOONLY")
    assert list(outcome.statuses.values()) == ["Unknown Status: 0x124"]  # Refused: Not Authorized (PS3.7 C.5)
    assert running_node.instances() == []


@pytest.mark.parametrize(
    ("change", "log"),
    [
        ({"SeriesInstanceUID": None}, "SeriesInstanceUID '' is not a valid UID: missing"),
        ({"SeriesInstanceUID": "1.2.abc.4"}, "is not a valid UID"),
        ({"StudyInstanceUID": "../../../tmp"}, "is not a valid UID"),
        ({"StudyInstanceUID": "1." + "2" * 70}, "longer than 64"),
    ],
)
def test_bad_uids_get_a_failure_and_leave_nothing(running_node, ct_series, tmp_path, caplog, change, log):
    ds = dcmread(ct_series[0])
    for keyword, value in change.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    bad = tmp_path / "bad.dcm"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.save_as(bad)
    outcome = storescu_verbose(running_node.port, [bad])
    assert outcome.failed() == [str(bad)]
    assert log in caplog.text
    assert running_node.instances() == []
    assert running_node.stray_files() == []


def test_unparsable_data_set_is_refused(running_node, ct_series, tmp_path, caplog):
    """pynetdicom as a raw sender: the data set bytes are garbage after a valid file meta."""
    from pynetdicom import AE, _config

    raw = ct_series[0].read_bytes()
    ds = dcmread(ct_series[0], stop_before_pixels=True)
    meta_end = raw.index(b"\x08\x00", 132 + 12)  # first element after group 0002
    bad = tmp_path / "garbage.dcm"
    bad.write_bytes(raw[:meta_end] + b"\x08\x00\x16\x00UI\xff\xff" + b"\x00" * 64)
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    previous, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        assoc = ae.associate("127.0.0.1", running_node.port, ae_title="DICOM_NODE")
        assert assoc.is_established
        rsp = assoc.send_c_store(bad)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    assert rsp.Status == 0xC000
    assert "cannot be parsed" in caplog.text
    assert running_node.instances() == [] and running_node.stray_files() == []


def test_concurrent_associations_all_land(running_node, ct_series):
    outcomes = []
    threads = [
        threading.Thread(target=lambda chunk=ct_series[i::4]: outcomes.append(storescu_verbose(running_node.port, chunk)))
        for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(len(o.succeeded()) for o in outcomes) == len(ct_series)
    assert len(running_node.instances()) == len(ct_series)


def send_raw_with_pynetdicom(port: int, path, calling_ae: str = "STORESCU") -> int | None:
    """C-STORE a file's data set byte for byte in its own transfer syntax; None if it cannot be sent."""
    from pynetdicom import AE, _config

    try:
        ds = dcmread(path, stop_before_pixels=True)
        sop_class, syntax = ds.SOPClassUID, ds.file_meta.TransferSyntaxUID
    except Exception:  # noqa: BLE001 - no usable file meta: no client can send it as is
        return None
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(sop_class, syntax)
    previous, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOM_NODE")
        if not assoc.is_established:
            return None  # SOP class or transfer syntax not offered by the node: the context was refused
        try:
            rsp = assoc.send_c_store(path)
        except (ValueError, AttributeError):
            return None
        finally:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    return int(rsp.Status) if "Status" in rsp else None


@pytest.mark.slow
def test_every_real_file_is_stored_and_findable_or_refused(running_node):
    """pydicom's and pydicom-data's files: each is stored and findable, or refused; nothing half-stored.

    DCMTK storescu sends each file first; files it cannot send (JPEG 2000 without a codec in DCMTK, odd
    files) go through pynetdicom as a raw sender in their own transfer syntax.
    """
    stored, refused = [], []
    for path in real_dicom_files():
        outcome = storescu_verbose(running_node.port, [path], extra=["-R"])  # propose only what the file needs
        if outcome.succeeded():
            stored.append(path)
        elif outcome.failed():
            refused.append(path)
        else:
            status = send_raw_with_pynetdicom(running_node.port, path)
            if status == 0:
                stored.append(path)
            elif status is not None:
                refused.append(path)
    rows = {r.sop_instance_uid: r for r in running_node.instances()}
    for path in stored:
        ds = dcmread(path, stop_before_pixels=True, force=True)
        assert ds.SOPInstanceUID in rows, path.name
        assert (running_node.config.storage.path / rows[ds.SOPInstanceUID].path).is_file()
        found = findscu(running_node.port, "IMAGE", {"StudyInstanceUID": ds.StudyInstanceUID,
                                                      "SeriesInstanceUID": ds.SeriesInstanceUID,
                                                      "SOPInstanceUID": ds.SOPInstanceUID})
        assert [f.SOPInstanceUID for f in found] == [ds.SOPInstanceUID], path.name
    stored_uids = {dcmread(p, stop_before_pixels=True, force=True).get("SOPInstanceUID") for p in stored}
    for path in refused:
        ds = dcmread(path, stop_before_pixels=True, force=True)
        wanted = ds.get("SOPClassUID") in STORAGE_SOP_CLASSES and all(
            is_valid_uid(ds.get(k)) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"))
        # A supported, well-formed instance may only be refused when another file already holds its UID.
        assert not wanted or ds.SOPInstanceUID in stored_uids, f"{path.name} should have been stored"
    assert len(stored) >= 40 and len(refused) >= 1
    assert len(rows) == len(stored_uids)
    assert running_node.stray_files() == []
