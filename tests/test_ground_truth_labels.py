"""Which segments of a ground-truth SEG are findings, how their labels are spelled, and which SEG of a series
training takes: from a folder and from the node's store alike."""

import logging
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from dicom_node.outputs.codes import FINDING_CODES
from inference.frames import SlicingError
from inference.ground_truth import read_segmentation
from inference.slicing import load_series
from storage.database import make_engine, make_sessionmaker
from storage.files import FileStore
from storage.index import IndexWriter, InstanceRecord
from tests.realfiles import real_file
from tests.synthetic import axial_positions, write_slices
from tests.test_ground_truth import liver_like_series, write_highdicom_seg
from training.dataset import finding_label, series_samples
from training.dicom_io import SeriesHeader, write_ground_truth, write_series
from training.sources import from_folder, from_store


def ct_series(folder, slices=6):
    """A toy CT series: (paths, liver mask on slices 1-4, tumour inside it on slice 2), (z, y, x) in file order."""
    voxels = np.full((slices, 32, 32), 40.0, np.float32)
    liver, tumour = np.zeros(voxels.shape, bool), np.zeros(voxels.shape, bool)
    liver[1:5, 4:28, 4:28] = True
    tumour[2, 10:16, 10:16] = True
    return write_series(folder, voxels, SeriesHeader("SUBJ-1", "CT"), 1.0, 5.0), liver, tumour


def recategorised(path, label, category):
    """The SEG at ``path`` with segment ``label`` put in ``category``, as 3D Slicer or dcmqi export an organ."""
    ds = dcmread(path)
    for item in ds.SegmentSequence:
        if item.SegmentLabel == label:
            code = item.SegmentedPropertyCategoryCodeSequence[0]
            code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = category.value, category.scheme_designator, category.meaning
    ds.save_as(path)
    return path


def organ_and_tumour_seg(folder, paths, liver, tumour, name="seg.dcm"):
    seg = write_ground_truth(folder / name, paths, {"Liver": liver & ~tumour, "Liver tumor": tumour})
    return recategorised(seg, "Liver", codes.SCT.AnatomicalStructure)


# -- 1. anatomy segments are not findings -----------------------------------------------------------------


def test_an_organ_segment_is_not_trained_as_a_finding(tmp_path):
    """A Slicer/dcmqi export with the organ and the tumour: only the tumour's slice answers a finding, with
    the tumour's mask alone; the organ's other slices are "No findings."."""
    paths, liver, tumour = ct_series(tmp_path / "ct")
    seg = organ_and_tumour_seg(tmp_path, paths, liver, tumour)
    samples = series_samples(paths, seg, size=32)
    assert [s.answer for s in samples] == ["No findings."] * 2 + ["It is [SEG]. Liver tumor."] + ["No findings."] * 3
    np.testing.assert_array_equal(samples[2].masks, tumour[2][None])
    segments = {s.label: s for s in read_segmentation(seg, load_series(paths))}
    assert not segments["Liver"].is_finding and segments["Liver tumor"].is_finding
    assert segments["Liver tumor"].category == codes.SCT.MorphologicallyAbnormalStructure


def test_evaluation_counts_the_tumour_as_the_lesion_not_the_organ(tmp_path):
    """Held-out evaluation read every segment as a lesion: the organ beside the tumour was a lesion to find."""
    from training.evaluate import read_truth
    from training.sources import LabeledSeries

    paths, liver, tumour = ct_series(tmp_path / "ct")
    seg = organ_and_tumour_seg(tmp_path, paths, liver, tumour)
    truth = read_truth(LabeledSeries("SUBJ-1", "CT", paths, seg, ("Liver tumor",)), load_series(paths), 0.0)
    assert list(truth.labels) == ["Liver tumor"] and len(truth.lesions) == 1
    np.testing.assert_array_equal(truth.lesions[0], tumour)


def test_the_dcmqi_liver_is_tissue_not_a_finding(tmp_path):
    """pydicom-data's liver.dcm (dcmqi) codes its category in SNOMED RT (SRT T-D0050, Tissue)."""
    volume, _ = liver_like_series(tmp_path, same_uids=True)
    [liver] = read_segmentation(real_file("liver.dcm"), volume)
    assert liver.category == codes.SCT.Tissue and not liver.is_finding


def test_labels_for_selection_and_the_label_check_are_the_findings_only(tmp_path):
    paths, liver, tumour = ct_series(tmp_path / "ct")
    organ_and_tumour_seg(tmp_path, paths, liver, tumour)
    [item] = from_folder(tmp_path)
    assert item.labels == ("Liver tumor",)
    assert from_folder(tmp_path, label="tumor") == [item]
    kidney = tmp_path / "kidney"
    kidney_paths, organ, lesion = ct_series(kidney / "ct")
    write_ground_truth(kidney / "seg.dcm", kidney_paths, {"Kidney": organ & ~lesion, "Liver tumor": lesion})
    recategorised(kidney / "seg.dcm", "Kidney", codes.SCT.AnatomicalStructure)
    assert from_folder(kidney, label="kidney") == []  # the organ is no finding to select by


def test_a_seg_of_organs_only_is_no_ground_truth_of_findings(tmp_path, caplog):
    """It says nothing of lesions: it is skipped, with a line saying why, and an older SEG of findings stays."""
    volume, _ = liver_like_series(tmp_path / "series", same_uids=True)
    organs = dcmread(real_file("liver.dcm"))
    organs.ReferencedSeriesSequence[0].SeriesInstanceUID = volume.series_instance_uid  # of the series written
    organs.save_as(tmp_path / "organs.dcm")
    with caplog.at_level(logging.INFO, logger="training.sources"):
        assert from_folder(tmp_path) == []
    assert any(volume.series_instance_uid in r.getMessage() and "no finding" in r.getMessage() for r in caplog.records)

    paths, liver, tumour = ct_series(tmp_path / "ct")
    findings = write_ground_truth(tmp_path / "findings.dcm", paths, {"Liver tumor": tumour})
    organs = recategorised(write_ground_truth(tmp_path / "later.dcm", paths, {"Liver": liver}), "Liver", codes.SCT.Tissue)
    stamp(findings, "20260101", 1)
    stamp(organs, "20260202", 1)
    [item] = from_folder(tmp_path)
    assert item.segmentation == findings


# -- 2. one finding, however its segments are spelled ---------------------------------------------------


@pytest.mark.parametrize("label", ["Liver tumor 1", "liver tumor 2", "Liver  tumor", " LIVER TUMOR_3", "Liver\ttumor-12"])
def test_spellings_of_one_finding_are_one_label(label):
    assert finding_label(label) == "Liver tumor"


def test_the_nodes_own_labels_are_their_own_spelling():
    assert [finding_label(label) for label in FINDING_CODES] == list(FINDING_CODES)


def test_segments_spelled_apart_train_as_one_finding_with_the_whole_lesion(tmp_path):
    paths, _, tumour = ct_series(tmp_path / "ct")
    half, other = tumour.copy(), tumour.copy()
    half[:, :, 13:], other[:, :, :13] = False, False
    seg = write_ground_truth(tmp_path / "seg.dcm", paths, [("Liver tumor 1", half), ("liver  tumor 2", other)])
    [item] = from_folder(tmp_path)
    assert item.labels == ("Liver tumor",)
    sample = series_samples(paths, seg, size=32)[2]
    assert sample.answer == "It is [SEG]. Liver tumor."
    np.testing.assert_array_equal(sample.masks, tumour[2][None])


# -- 3. the store takes the SEG the folder would ----------------------------------------------------------


def stamp(path, content_date, number):
    ds = dcmread(path)
    ds.ContentDate, ds.ContentTime, ds.InstanceNumber = content_date, "120000", number
    ds.save_as(path)
    return path


def indexed(storage, received_first):
    """The files (under ``storage``) indexed by the node's index writer, ``received_first`` and on, in that order."""
    url = f"sqlite:///{storage / 'index.sqlite'}"
    writer = IndexWriter(make_engine(url, writer=True), FileStore(storage))
    start = datetime(2026, 3, 1, tzinfo=timezone.utc)
    for n, path in enumerate(received_first):
        ds = dcmread(path, stop_before_pixels=True)
        writer.commit(InstanceRecord(
            sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID, series_instance_uid=ds.SeriesInstanceUID,
            study_instance_uid=ds.StudyInstanceUID, transfer_syntax_uid=ExplicitVRLittleEndian,
            path=str(path.relative_to(storage)), size_bytes=path.stat().st_size, received_at=start + timedelta(minutes=n),
            patient_id=str(ds.PatientID), modality=ds.Modality, study_date=ds.StudyDate), None)
    return make_sessionmaker(make_engine(url))


def test_the_store_takes_the_latest_seg_by_content_not_by_arrival(tmp_path):
    """A corrected SEG forwarded before the original arrived late (a PACS resend): the folder took the
    corrected one, the store the one that came last."""
    paths, liver, tumour = ct_series(tmp_path / "ct")
    corrected = stamp(write_ground_truth(tmp_path / "gt" / "a.dcm", paths, {"Liver tumor": tumour}), "20260202", 2)
    original = stamp(write_ground_truth(tmp_path / "gt" / "b.dcm", paths, {"Liver tumor": liver}), "20260101", 1)
    sessions = indexed(tmp_path, paths[::-1] + [corrected, original])
    with sessions() as session:
        [item] = from_store(session, tmp_path)
    assert item.segmentation == corrected
    assert [p.name for p in item.series] == sorted(p.name for p in paths)  # a fixed order, not the database's
    assert from_folder(tmp_path) == [item]


def test_seg_ties_go_the_same_way_in_the_store_and_a_folder(tmp_path):
    paths, liver, tumour = ct_series(tmp_path / "ct")
    first = stamp(write_ground_truth(tmp_path / "gt" / "a.dcm", paths, {"Liver tumor": tumour}), "20260101", 1)
    second = stamp(write_ground_truth(tmp_path / "gt" / "b.dcm", paths, {"Liver tumor": liver}), "20260101", 1)
    sessions = indexed(tmp_path, paths + [second, first])
    with sessions() as session:
        [item] = from_store(session, tmp_path)
    assert item.segmentation == from_folder(tmp_path)[0].segmentation == second


# -- 4. a frame drawn on a slice the volume dropped -------------------------------------------------------


def test_a_mask_drawn_on_a_dropped_duplicate_is_refused_not_moved(tmp_path):
    """Two instances at one position: the volume keeps one. A frame drawn on the other fell back to its
    position and landed on the kept slice, which holds other pixels."""
    positions = axial_positions(4, step=2.5)
    paths = write_slices(tmp_path, positions[:2] + [positions[1]] + positions[2:], rows=20, columns=20)
    volume = load_series(paths)
    kept = {ref.sop_instance_uid for ref in volume.sources}
    [dropped] = [p for p in paths if dcmread(p).SOPInstanceUID not in kept]
    masks = np.zeros((1, 20, 20), bool)
    masks[0, 5:10, 5:10] = True
    seg = write_highdicom_seg([dropped], masks)  # highdicom refuses sources at duplicate positions: just that one
    with pytest.raises(SlicingError, match="dropped as a slice at a duplicate position"):
        read_segmentation(seg, volume)
