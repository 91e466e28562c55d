"""The TID 1500 SR the node writes: valid for dciodvfy, explicit about no findings and about scope."""

import logging
import warnings

import highdicom as hd
import pytest
from pydicom import config

from dicom_node.outputs.seg import AlgorithmInfo, build_seg
from dicom_node.privacy import keep_patient_data_out_of_logs
from dicom_node.outputs.sr import build_sr
from inference.engine import Assessment, SeriesResult
from tests.test_outputs_seg import ALGORITHM, dciodvfy_errors, series_with_lesions  # noqa: F401 - fixture


def test_report_lists_each_lesion_with_measurements_and_seg_reference(series_with_lesions, tmp_path):
    sources, volume, lesions, _ = series_with_lesions
    lesions[0].texts = ["It is [SEG]. Liver tumor."]
    seg = build_seg(sources, volume, lesions, ALGORITHM)
    result = SeriesResult(Assessment.ASSESSED, "", lesions, ALGORITHM.version)
    sr = build_sr(sources, volume, result, seg, ALGORITHM)
    path = tmp_path / "sr.dcm"
    sr.save_as(path)
    assert dciodvfy_errors(path) == []
    report = hd.sr.srread(path)
    groups = report.content.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["Liver tumor 1", "Kidney tumor 1"]
    volume_ml = groups[0].get_measurements(name=hd.sr.CodedConcept("118565006", "SCT", "Volume"))[0].value
    assert float(volume_ml) == pytest.approx(round(lesions[0].volume_ml, 3))
    assert groups[0].referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
    referenced_images = {str(e.value) for e in groups[0][0].iterall() if e.keyword == "ReferencedSOPInstanceUID"}
    assert {s.sop_instance_uid for s in lesions[0].sources} <= referenced_images
    assert "It is [SEG]. Liver tumor." in [str(e.value) for e in groups[0][0].iterall() if e.keyword == "TextValue"]
    assert report.PatientID == sources[0].PatientID and report.StudyInstanceUID == sources[0].StudyInstanceUID


@pytest.mark.parametrize(("assessment", "reason", "says"), [
    (Assessment.ASSESSED, "", "Clinical finding absent"),
    (Assessment.NOT_ASSESSED, "MR is outside the model's scope (CT)", "Not done"),
])
def test_no_findings_and_not_assessed_are_explicit(series_with_lesions, tmp_path, assessment, reason, says):
    sources, volume, _, _ = series_with_lesions
    sr = build_sr(sources, volume, SeriesResult(assessment, reason, [], ALGORITHM.version), None, ALGORITHM)
    path = tmp_path / "sr.dcm"
    sr.save_as(path)
    assert dciodvfy_errors(path) == []
    report = hd.sr.srread(path)
    values = [str(e.value) for e in report.iterall() if e.keyword in ("TextValue", "CodeMeaning")]
    assert says in values
    if reason:
        assert f"Not assessed: {reason}" in values


def test_a_no_findings_statement_is_tracked_per_model_version_and_run(series_with_lesions, tmp_path):
    """Trackers link groups by Tracking UID: "No findings" from another model version or a re-run is another
    observation, while a retry of the same run (a resend) keeps its UID."""
    sources, volume, _, _ = series_with_lesions

    def uid(version: str, run: int) -> str:
        algorithm = AlgorithmInfo(ALGORITHM.name, version)
        sr = build_sr(sources, volume, SeriesResult(Assessment.ASSESSED, "", [], version), None, algorithm, run)
        sr.save_as(tmp_path / "sr.dcm")
        [group] = hd.sr.srread(tmp_path / "sr.dcm").content.get_image_measurement_groups()  # the statement's group
        return group.tracking_uid

    assert uid("1.0.0", 1) == uid("1.0.0", 1)
    assert len({uid("1.0.0", 1), uid("1.1.0", 1), uid("1.0.0", 2)}) == 3


def test_malformed_birth_date_and_one_part_name_still_give_valid_outputs_and_no_name_in_warnings(series_with_lesions, tmp_path,
                                                                                                    monkeypatch):
    """Common PACS data: a birth date written 1980-01-01 failed the job (the date in its error), and highdicom
    warned on the node's stderr with the name of a patient called "DOE"."""
    sources, volume, lesions, _ = series_with_lesions
    with config.disable_value_validation():
        for ds in sources:
            ds.PatientName, ds.PatientBirthDate, ds.StudyTime = "DOE", "1980-01-01", "25:99"
    with warnings.catch_warnings(record=True) as caught:
        monkeypatch.setattr(logging.getLogger("pydicom"), "level", logging.getLogger("pydicom").level)  # restored after
        keep_patient_data_out_of_logs(debug=False)  # as the node sets up its log
        warnings.filterwarnings("always", category=UserWarning, append=True)  # after the node's own filters
        seg = build_seg(sources, volume, lesions, ALGORITHM)
        sr = build_sr(sources, volume, SeriesResult(Assessment.ASSESSED, "", lesions, ALGORITHM.version), seg, ALGORITHM)
    assert not [w for w in caught if "DOE" in str(w.message)]
    for name, written in (("seg", seg), ("sr", sr)):
        written.save_as(tmp_path / f"{name}.dcm")
        assert dciodvfy_errors(tmp_path / f"{name}.dcm") == []
        assert (written.PatientName, written.PatientBirthDate, written.StudyTime) == ("DOE", "", "")  # type 2: empty
    assert sources[0].PatientBirthDate == "1980-01-01"  # the caller's data sets are left as they were


def _tracking(seg_path, sr_path) -> tuple[dict[int, tuple[str, str]], list[tuple[int, str, str]]]:
    """({segment number: (Tracking UID, Tracking ID)} of the SEG, [(segment, UID, ID)] of the SR's groups)."""
    seg = hd.seg.segread(seg_path)
    segments = {n: (seg.get_segment_description(n).tracking_uid, seg.get_segment_description(n).tracking_id)
                for n in seg.segment_numbers}
    groups = hd.sr.srread(sr_path).content.get_volumetric_roi_measurement_groups()
    return segments, [(g.referenced_segment.referenced_segment_numbers[0], g.tracking_uid, g.tracking_identifier)
                      for g in groups]


def test_each_measurement_group_tracks_the_lesion_of_the_seg_segment_it_references(series_with_lesions, tmp_path):
    """TID 1500 readers, and the evaluation, link a measurement to its segment by Tracking UID: the SR gave each
    lesion a UID of its own (without the model version), unlike the SEG's."""
    sources, volume, lesions, _ = series_with_lesions
    result = SeriesResult(Assessment.ASSESSED, "", lesions, ALGORITHM.version)
    written = {}
    for name, algorithm, run in (("first", ALGORITHM, 1), ("again", ALGORITHM, 1),
                                 ("other model", AlgorithmInfo(ALGORITHM.name, "0.2.0-test"), 1), ("run 2", ALGORITHM, 2)):
        seg = build_seg(sources, volume, lesions, algorithm, run)
        sr = build_sr(sources, volume, result, seg, algorithm, run)
        seg.save_as(tmp_path / f"{name}.seg.dcm")
        sr.save_as(tmp_path / f"{name}.sr.dcm")
        assert dciodvfy_errors(tmp_path / f"{name}.seg.dcm") == [] and dciodvfy_errors(tmp_path / f"{name}.sr.dcm") == []
        segments, groups = _tracking(tmp_path / f"{name}.seg.dcm", tmp_path / f"{name}.sr.dcm")
        assert [number for number, _, _ in groups] == [1, 2]
        for number, uid, identifier in groups:
            assert (uid, identifier) == segments[number]
        written[name] = [uid for _, uid, _ in groups]
    assert len(set(written["first"])) == 2  # two lesions, two UIDs
    assert written["again"] == written["first"]  # a retry of a run is the same objects
    assert set(written["other model"]).isdisjoint(written["first"])  # another model's lesions are other findings
    assert set(written["run 2"]).isdisjoint(written["first"])
