"""C-FIND (Study Root) answered from the index, driven by DCMTK findscu."""

import logging
import warnings

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from tests.dcmtk import findscu, storescu_verbose


@pytest.fixture
def two_studies(running_node, ct_series, tmp_path):
    """The CT series (patient BENCH^CT, 20260101) and one MR-labelled study of another patient."""
    other = []
    study, series = generate_uid(), generate_uid()
    for k, source in enumerate(ct_series[:2]):
        ds = dcmread(source)
        ds.PatientName, ds.PatientID, ds.StudyDate, ds.AccessionNumber = "Müller^Anna", "P-002", "20250615", "ACC9"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.Modality, ds.SeriesDescription = "CT", "Second study"
        path = tmp_path / f"other{k}.dcm"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds.save_as(path)
        other.append(path)
    outcome = storescu_verbose(running_node.port, ct_series + other)
    assert len(outcome.succeeded()) == len(ct_series) + 2
    return dcmread(ct_series[0]), dcmread(other[0])


def test_study_level_by_patient_name_wildcard(running_node, two_studies):
    ct, _ = two_studies
    found = findscu(running_node.port, "STUDY", {"PatientName": "bench*", "StudyInstanceUID": "", "NumberOfStudyRelatedInstances": ""})
    assert [f.StudyInstanceUID for f in found] == [ct.StudyInstanceUID]
    assert int(found[0].NumberOfStudyRelatedInstances) == 20


def test_study_level_non_ascii_name_round_trips(running_node, two_studies):
    _, other = two_studies
    found = findscu(running_node.port, "STUDY", {"PatientID": "P-002", "PatientName": ""})
    assert len(found) == 1 and str(found[0].PatientName) == "Müller^Anna"


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"StudyDate": "20260101-"}, {"BENCH001"}),
        ({"StudyDate": "-20251231"}, {"P-002"}),
        ({"StudyDate": "20250101-20261231"}, {"BENCH001", "P-002"}),
        ({"AccessionNumber": "ACC9"}, {"P-002"}),
        ({"PatientID": "BENCH0?1"}, {"BENCH001"}),
        ({"ModalitiesInStudy": "MR"}, set()),
        ({"ModalitiesInStudy": "CT"}, {"BENCH001", "P-002"}),
    ],
)
def test_study_level_matching(running_node, two_studies, keys, expected):
    found = findscu(running_node.port, "STUDY", {**keys, "PatientID": keys.get("PatientID", "")})
    assert {f.PatientID for f in found} == expected


def test_series_and_image_levels_with_uid_lists(running_node, two_studies):
    ct, other = two_studies
    series = findscu(running_node.port, "SERIES", {"StudyInstanceUID": f"{ct.StudyInstanceUID}\\{other.StudyInstanceUID}",
                                                   "SeriesInstanceUID": "", "Modality": "CT", "NumberOfSeriesRelatedInstances": ""})
    assert sorted(int(s.NumberOfSeriesRelatedInstances) for s in series) == [2, 20]
    images = findscu(running_node.port, "IMAGE", {"StudyInstanceUID": ct.StudyInstanceUID, "SeriesInstanceUID": ct.SeriesInstanceUID,
                                                  "SOPInstanceUID": "", "InstanceNumber": "3"})
    assert len(images) == 1 and int(images[0].InstanceNumber) == 3


def test_find_refused_to_peer_without_find_permission(running_node, two_studies, caplog):
    assert findscu(running_node.port, "STUDY", {"PatientID": ""}, calling_ae="ECHOONLY") == []
    assert "find refused to 'ECHOONLY'" in caplog.text


def test_a_malformed_stored_value_is_answered_as_stored_and_not_logged(caplog):
    """A birth date a PACS sent as "01/01/1980" is what the node holds: the answer gives it back, and building
    the answer does not make pydicom log or warn it (its value check quotes the value at WARNING)."""
    from dicom_node.find import match_to_dataset
    from storage.query import QueryLevel

    caplog.set_level(logging.DEBUG)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = match_to_dataset(QueryLevel.STUDY, {"PatientBirthDate": "01/01/1980", "PatientName": "Doe^Jane",
                                                 "NumberOfStudyRelatedInstances": 3, "StudyDate": None})
    assert (ds.PatientBirthDate, str(ds.PatientName), ds.NumberOfStudyRelatedInstances, ds.StudyDate) == ("01/01/1980", "Doe^Jane", 3, "")
    assert "01/01/1980" not in caplog.text and not [w for w in caught if "01/01/1980" in str(w.message)]
