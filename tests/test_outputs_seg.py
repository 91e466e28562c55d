"""The DICOM-SEG the node writes: valid for dciodvfy, readable by highdicom, masks on the right pixels."""

import shutil
import subprocess

import highdicom as hd
import numpy as np
import pytest
from pydicom import dcmread

from dicom_node.outputs.seg import AlgorithmInfo, OutputError, build_seg, segment_labels
from dicom_node.outputs.uids import output_uids, stable_uid
from inference.findings import SliceFinding, aggregate
from inference.ground_truth import read_segmentation
from inference.reliability import Reliability
from inference.slicing import load_series
from tests.synthetic import axial_positions, write_slices

ALGORITHM = AlgorithmInfo("dicom-node built-in", "0.1.0-test")


def dciodvfy_errors(path) -> list[str]:
    if shutil.which("dciodvfy") is None:
        pytest.fail("dciodvfy missing (make test installs dicom3tools)")
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture
def series_with_lesions(tmp_path):
    paths = write_slices(tmp_path / "ct", axial_positions(8, step=2.5), rows=64, columns=48)  # no StudyDate, BirthDate...
    volume = load_series(paths[::-1])
    findings = []
    for k in (2, 3, 4):
        mask = np.zeros((64, 48), bool)
        mask[10:30, 5:20] = True
        findings.append(SliceFinding(k, "Liver tumor", mask, 0.9, Reliability.HIGH))
    second = np.zeros((64, 48), bool)
    second[40:60, 30:45] = True
    findings.append(SliceFinding(6, "Kidney tumor", second, 0.8, Reliability.MEDIUM))
    lesions = aggregate(volume, findings, min_volume_ml=0.0)
    sources = [dcmread(p, stop_before_pixels=True) for p in paths]
    return sources, volume, lesions, tmp_path


def test_seg_is_valid_and_lands_on_the_source_pixels(series_with_lesions):
    sources, volume, lesions, tmp_path = series_with_lesions
    seg = build_seg(sources, volume, lesions, ALGORITHM)
    path = tmp_path / "seg.dcm"
    seg.save_as(path)
    assert dciodvfy_errors(path) == []
    segments = read_segmentation(path, volume)
    assert [s.label for s in segments] == segment_labels(lesions) == ["Liver tumor 1", "Kidney tumor 1"]
    for segment, lesion in zip(segments, lesions):
        np.testing.assert_array_equal(segment.mask, lesion.mask)
    assert [s.property_type for s in segments] == ["Neoplasm", "Neoplasm"]
    assert int(seg.NumberOfFrames) == 4  # three liver slices, one kidney slice: empty frames omitted


def test_seg_reads_back_in_highdicom_with_identity_and_algorithm(series_with_lesions):
    sources, volume, lesions, tmp_path = series_with_lesions
    path = tmp_path / "seg.dcm"
    build_seg(sources, volume, lesions, ALGORITHM).save_as(path)
    seg = hd.seg.segread(path)
    assert seg.PatientID == sources[0].PatientID and seg.StudyInstanceUID == sources[0].StudyInstanceUID
    assert seg.FrameOfReferenceUID == volume.frame_of_reference_uid
    assert seg.SeriesInstanceUID != sources[0].SeriesInstanceUID and "not for diagnosis" in seg.SeriesDescription
    description = seg.get_segment_description(1)
    assert description.algorithm_identification[0].AlgorithmName == ALGORITHM.name
    assert description.algorithm_identification[0].AlgorithmFamilyCodeSequence[0].CodeMeaning == "Artificial Intelligence"
    referenced = {item.ReferencedSOPInstanceUID for series in seg.ReferencedSeriesSequence for item in series.ReferencedInstanceSequence}
    assert referenced == {str(ds.SOPInstanceUID) for ds in sources}  # every source instance, not only those with a mask


def test_uids_are_stable_per_series_model_and_kind(series_with_lesions):
    sources, volume, lesions, _ = series_with_lesions
    first, again = build_seg(sources, volume, lesions, ALGORITHM), build_seg(sources, volume, lesions, ALGORITHM)
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (again.SeriesInstanceUID, again.SOPInstanceUID)
    assert output_uids(volume.series_instance_uid, "0.2", "SEG") != output_uids(volume.series_instance_uid, "0.1.0-test", "SEG")
    assert output_uids(volume.series_instance_uid, "0.2", "SEG") != output_uids(volume.series_instance_uid, "0.2", "SR")
    uid = stable_uid("x")
    assert uid.startswith("2.25.") and len(uid) <= 44


def test_no_lesion_no_seg(series_with_lesions):
    sources, volume, _, _ = series_with_lesions
    with pytest.raises(OutputError, match="SR only"):
        build_seg(sources, volume, [], ALGORITHM)


def test_build_seg_leaves_the_callers_sources_untouched(series_with_lesions):
    sources, volume, lesions, _ = series_with_lesions
    assert "StudyDate" not in sources[0] and "SliceThickness" not in sources[0]
    build_seg(sources, volume, lesions, ALGORITHM)
    assert "StudyDate" not in sources[0] and "SliceThickness" not in sources[0]


def test_overlapping_lesions_of_two_labels_are_written_as_separate_segments(tmp_path):
    paths = write_slices(tmp_path / "ct", axial_positions(4, step=2.5), rows=32, columns=32)
    volume = load_series(paths)
    a, b = np.zeros((32, 32), bool), np.zeros((32, 32), bool)
    a[5:20, 5:20], b[10:25, 10:25] = True, True  # overlap on purpose
    lesions = aggregate(volume, [SliceFinding(1, "Liver tumor", a, 0.9, Reliability.HIGH),
                                 SliceFinding(1, "Liver cyst", b, 0.9, Reliability.HIGH)], min_volume_ml=0.0)
    path = tmp_path / "seg.dcm"
    build_seg([dcmread(p, stop_before_pixels=True) for p in paths], volume, lesions, ALGORITHM).save_as(path)
    assert dciodvfy_errors(path) == []
    segments = {s.label: s.mask for s in read_segmentation(path, volume)}
    np.testing.assert_array_equal(segments["Liver tumor 1"][1], a)
    np.testing.assert_array_equal(segments["Liver cyst 1"][1], b)


PYDICOM_SEG_READER = """
import sys, numpy, pydicom, pydicom_seg
reader = pydicom_seg.SegmentReader().read(pydicom.dcmread(sys.argv[1]))
numpy.savez(sys.argv[2], **{str(n): reader.segment_data(n) for n in sorted(reader.available_segments)})
"""


def test_seg_reads_back_in_pydicom_seg(series_with_lesions):
    """pydicom-seg needs pydicom 2, so it runs in its own venv (made by `make test`)."""
    from pathlib import Path

    python = Path(__file__).resolve().parents[1] / ".venv-pydicomseg" / "bin" / "python"
    if not python.exists():
        pytest.fail(f"{python} missing: run `make test`, which creates it")
    sources, volume, lesions, tmp_path = series_with_lesions
    path, out = tmp_path / "seg.dcm", tmp_path / "segments.npz"
    build_seg(sources, volume, lesions, ALGORITHM).save_as(path)
    subprocess.run([str(python), "-c", PYDICOM_SEG_READER, str(path), str(out)], check=True, capture_output=True)
    segments = np.load(out)
    first = min(lesion.slice_range[0] for lesion in lesions)
    last = max(lesion.slice_range[1] for lesion in lesions)
    for number, lesion in enumerate(lesions, start=1):  # pydicom-seg returns the frames' extent, in position order
        np.testing.assert_array_equal(segments[str(number)].astype(bool), lesion.mask[first:last + 1])
