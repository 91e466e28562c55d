"""Ground-truth DICOM-SEG placed on the slices of a Volume: a real dcmqi SEG, and highdicom SEGs we write."""

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from inference.frames import SlicingError
from inference.ground_truth import read_segmentation
from inference.slicing import load_series
from tests.realfiles import real_file
from tests.synthetic import axial_positions, write_legacy_enhanced_mr, write_slices


def liver_like_series(tmp_path, same_uids: bool, same_frame: bool = True):
    """A CT series on the grid of pydicom-data's liver.dcm (written by dcmqi), plus two slices beyond it."""
    seg = dcmread(real_file("liver.dcm"))
    frames = seg.PerFrameFunctionalGroupsSequence
    positions = [[float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient] for f in frames]
    positions = [[positions[0][0], positions[0][1], positions[0][2] - 1.0]] + positions + [[positions[0][0], positions[0][1], positions[-1][2] + 1.0]]
    uids = [f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID for f in frames]
    uids = [generate_uid()] + (uids if same_uids else [generate_uid() for _ in uids]) + [generate_uid()]
    spacing = [float(v) for v in seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing]
    paths = write_slices(tmp_path, positions, rows=512, columns=512, spacing=tuple(spacing), sop_uids=uids,
                         frame_of_reference=seg.FrameOfReferenceUID if same_frame else generate_uid())
    return load_series(paths), seg


@pytest.mark.parametrize("same_uids", [True, False], ids=["by-instance", "by-position"])
def test_dcmqi_liver_seg_lands_on_its_slices(tmp_path, same_uids):
    volume, seg = liver_like_series(tmp_path, same_uids)
    [liver] = read_segmentation(real_file("liver.dcm"), volume)
    assert liver.label == "Liver" and liver.property_type == "Liver" and liver.number == 1
    frames = seg.pixel_array.astype(bool)
    assert not liver.mask[0].any() and not liver.mask[-1].any()
    for k in range(3):  # SEG frames are in position order; volume slices 1..3 hold them
        np.testing.assert_array_equal(liver.mask[k + 1], frames[k])


def test_seg_of_another_frame_of_reference_is_refused(tmp_path):
    volume, _ = liver_like_series(tmp_path, same_uids=False, same_frame=False)
    with pytest.raises(SlicingError, match="another frame of reference"):
        read_segmentation(real_file("liver.dcm"), volume)


def test_non_seg_is_refused(tmp_path):
    volume, _ = liver_like_series(tmp_path, same_uids=True)
    with pytest.raises(SlicingError, match="not a Segmentation"):
        read_segmentation(real_file("CT_small.dcm"), volume)


def write_highdicom_seg(source_paths, masks, fractional=False):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources = [dcmread(p) for p in source_paths]
    for ds in sources:
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName = "20260101", "120000", "A1", ""
        ds.PatientBirthDate, ds.PatientSex, ds.StudyID, ds.Manufacturer = "19700101", "O", "1", "test"
        ds.SliceThickness = 2.5
    description = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Tumor 1", segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Neoplasm, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL)
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=masks.astype(np.float32 if fractional else bool),
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL if fractional else hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description], series_instance_uid=hd.UID(), series_number=99, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="dicom-node tests", manufacturer_model_name="tests", software_versions="0",
        device_serial_number="0", omit_empty_frames=True)
    return seg


@pytest.mark.parametrize("fractional", [False, True], ids=["binary", "fractional"])
def test_mask_drawn_on_slice_k_comes_back_on_slice_k(tmp_path, fractional):
    paths = write_slices(tmp_path, axial_positions(6, step=2.5), rows=40, columns=30)
    volume = load_series(paths[::-1])  # file order must not matter
    k = 4
    drawn = np.zeros(volume.voxels.shape, dtype=bool)
    drawn[k, 10:20, 5:12] = True
    drawn[k, 30, 25] = True
    source_order = [paths.index(next(p for p in paths if dcmread(p).SOPInstanceUID == ref.sop_instance_uid)) for ref in volume.sources]
    masks = np.zeros((len(paths), 40, 30), dtype=bool)
    for slice_index, file_index in enumerate(source_order):
        masks[file_index] = drawn[slice_index]
    seg = write_highdicom_seg(paths, masks, fractional)
    assert int(seg.NumberOfFrames) == 1  # empty frames omitted: only slice k is in the SEG
    [segment] = read_segmentation(seg, volume)
    np.testing.assert_array_equal(segment.mask, drawn)
    assert segment.label == "Tumor 1" and segment.property_type == "Neoplasm"


def test_training_samples_use_the_inference_pipeline(tmp_path):
    """A SEG drawn on slice k becomes the target of sample k, on the model grid the model sees."""
    from inference.preprocess import prepare
    from training.dataset import series_samples

    paths = write_slices(tmp_path, axial_positions(5, step=2.5), rows=64, columns=48)
    volume = load_series(paths)
    masks = np.zeros((5, 64, 48), dtype=bool)
    file_of = {dcmread(p).SOPInstanceUID: i for i, p in enumerate(paths)}
    k = 2
    masks[file_of[volume.sources[k].sop_instance_uid], 20:40, 10:30] = True
    seg_path = tmp_path / "seg.dcm"
    write_highdicom_seg(paths, masks).save_as(seg_path)
    samples = series_samples(paths, seg_path, size=32)
    assert [s.answer for s in samples] == ["No findings."] * 2 + ["It is [SEG]. Tumor."] + ["No findings."] * 2  # "Tumor 1", unnumbered
    expected = prepare(volume, size=32)
    np.testing.assert_array_equal(samples[k].image, expected.images[k])
    drawn = np.zeros((1, 64, 48), dtype=bool)
    drawn[0, 20:40, 10:30] = True
    np.testing.assert_array_equal(samples[k].masks, expected.transform.mask_to_model(drawn))


def test_seg_of_a_multi_frame_series_lands_by_frame_reference_on_slice_0_too(tmp_path):
    """The frame that lies on slice 0 read as "not found" (index 0 is falsy): the SEG fell back to positions,
    and where those could not place it (another frame of reference) was refused as referencing no instance."""
    _, path = write_legacy_enhanced_mr(tmp_path, 4, rows=32, columns=32)
    volume = load_series([path])
    drawn = np.zeros(volume.voxels.shape, dtype=bool)
    drawn[0, 5:10, 5:12] = True
    drawn[2, 20:25, 10:14] = True
    masks = np.zeros_like(drawn)  # in the multi-frame object's frame order
    for k, ref in enumerate(volume.sources):
        masks[ref.frame_number - 1] = drawn[k]
    seg = write_highdicom_seg([path], masks)
    seg.FrameOfReferenceUID = generate_uid()  # its positions cannot place a frame: only the references can
    [segment] = read_segmentation(seg, volume)
    np.testing.assert_array_equal(segment.mask, drawn)
