"""The header reader must agree with pydicom on every real file, and refuse what it cannot walk."""

import io
import warnings
from datetime import datetime, timezone

import pytest
from pydicom import dcmread
from pydicom.filereader import _read_file_meta_info, read_preamble

from dicom_node import status
from dicom_node.header import HeaderFormatError, read_elements
from dicom_node.ingest import (
    IMPLEMENTATION_CLASS_UID,
    InvalidInstanceError,
    _read_header_pydicom,
    file_meta_bytes,
    read_header,
    to_record,
)
from tests.realfiles import real_dicom_files, real_file


def split_part10(path):
    """(meta bytes, data set bytes, transfer syntax) of a Part 10 file, or None if it has no meta."""
    raw = path.read_bytes()
    fp = io.BytesIO(raw)
    try:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
    except Exception:  # noqa: BLE001 - not a Part 10 file
        return None
    if "TransferSyntaxUID" not in meta:
        return None
    return raw[: fp.tell()], raw[fp.tell():], str(meta.TransferSyntaxUID)


def test_fast_header_reader_matches_pydicom_on_every_real_file():
    compared = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for path in real_dicom_files():
            parts = split_part10(path)
            if parts is None:
                continue
            meta, dataset, syntax = parts
            try:
                expected = _read_header_pydicom(meta + dataset)
            except InvalidInstanceError:
                continue
            assert read_header(meta, dataset, syntax) == expected, path.name
            compared += 1
    assert compared > 150  # pydicom and pydicom-data hold about 230 Part 10 files


def test_reader_stops_before_pixel_data_and_skips_sequences():
    meta, dataset, _ = split_part10(real_file("CT_small.dcm"))
    wanted = frozenset({0x0020000D, 0x00200013})
    found = read_elements(dataset, wanted, explicit_vr=True)
    ds = dcmread(real_file("CT_small.dcm"))
    assert found[0x0020000D].rstrip(b"\x00").decode() == ds.StudyInstanceUID
    assert int(found[0x00200013]) == ds.InstanceNumber


@pytest.mark.parametrize("cut", [3, 7, 11, 50])
def test_truncated_data_set_is_refused_not_misread(cut):
    _, dataset, _ = split_part10(real_file("CT_small.dcm"))
    with pytest.raises(HeaderFormatError):
        read_elements(dataset[:cut], frozenset({0x7FE00010}), explicit_vr=True)


def test_garbage_is_cannot_understand():
    meta = file_meta_bytes("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.1", "X")
    with pytest.raises(InvalidInstanceError) as info:
        read_header(meta, b"\xff" * 64, "1.2.840.10008.1.2.1")
    assert info.value.status == status.CANNOT_UNDERSTAND


def test_file_meta_is_valid_part10():
    meta = file_meta_bytes("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", "1.2.840.10008.1.2.4.70", "MODALITY1")
    _, dataset, _ = split_part10(real_file("CT_small.dcm"))
    ds = dcmread(io.BytesIO(meta + dataset), stop_before_pixels=True)
    assert ds.file_meta.MediaStorageSOPInstanceUID == "1.2.3.4"
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    assert ds.file_meta.SourceApplicationEntityTitle == "MODALITY1"
    assert ds.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID


@pytest.mark.parametrize(
    ("change", "expected"),
    [({"SeriesInstanceUID": ""}, status.MISSING_UID), ({"StudyInstanceUID": "1.2.x"}, status.INVALID_UID)],
)
def test_record_requires_valid_uids(change, expected):
    header = {"StudyInstanceUID": "1.2", "SeriesInstanceUID": "1.2.3", "SOPInstanceUID": "1.2.3.4", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2"}
    header.update(change)
    with pytest.raises(InvalidInstanceError) as info:
        to_record(header, "1.2.840.10008.1.2", "X", datetime.now(timezone.utc))
    assert info.value.status == expected


def test_malformed_numbers_do_not_refuse_the_instance():
    header = {"StudyInstanceUID": "1.2", "SeriesInstanceUID": "1.2.3", "SOPInstanceUID": "1.2.3.4",
              "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2", "InstanceNumber": "1A", "SeriesNumber": "7"}
    record = to_record(header, "1.2.840.10008.1.2", "X", datetime.now(timezone.utc))
    assert record.instance_number is None and record.series_number == 7 and record.number_of_frames == 1


def test_values_beyond_the_index_columns_do_not_refuse_the_instance():
    """PostgreSQL refuses a string longer than its column and SQLite an integer beyond 64 bits: the instance
    was answered "out of resources" for ever. The index keeps what fits; the file keeps everything."""
    header = {"StudyInstanceUID": "1.2", "SeriesInstanceUID": "1.2.3", "SOPInstanceUID": "1.2.3.4",
              "SOPClassUID": "1.2.840.10008.5.1.4.1.1.2", "PatientBirthDate": "1980-01-01", "StudyDate": "20260101",
              "StudyDescription": "D" * 70, "PatientID": "P" * 65, "SeriesNumber": "1" * 21, "InstanceNumber": "2147483648"}
    record = to_record(header, "1.2.840.10008.1.2", "X", datetime.now(timezone.utc))
    assert (record.patient_birth_date, record.study_date) == ("", "20260101")  # a malformed date: dropped
    assert (record.study_description, record.patient_id) == ("D" * 64, "P" * 64)  # cut to the column
    assert record.series_number is None and record.instance_number is None
    assert to_record({**header, "InstanceNumber": "-2147483648"}, "1.2.840.10008.1.2", "X",
                     datetime.now(timezone.utc)).instance_number == -2147483648


def test_a_corrupt_deflated_data_set_is_cannot_understand():
    deflated = "1.2.840.10008.1.2.1.99"
    meta = file_meta_bytes("1.2.840.10008.5.1.4.1.1.2", "1.2.3", deflated, "X")
    with pytest.raises(InvalidInstanceError) as info:
        read_header(meta, b"\x78\x9c" + b"\xff" * 64, deflated)  # a zlib header, then garbage
    assert info.value.status == status.CANNOT_UNDERSTAND
