"""load_series on real files (single-frame, enhanced multi-frame, compressed) and on every oddity PACS send."""

import random

import numpy as np
import pytest
from pydicom import dcmread

from inference.frames import SlicingError
from inference.slicing import GantryTiltError, MultipleStacksError, load_series, load_stacks
from tests.realfiles import real_file
from tests.synthetic import axial_positions, write_legacy_enhanced_mr, write_slices


def test_single_frame_ct_is_in_hounsfield_units():
    path = real_file("CT_small.dcm")
    ds = dcmread(path)
    volume = load_series([path])
    expected = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(volume.voxels[0], expected.astype(np.float32))
    assert volume.modality == "CT" and volume.sources[0].sop_instance_uid == ds.SOPInstanceUID
    np.testing.assert_allclose(volume.origin, [float(v) for v in ds.ImagePositionPatient])
    assert volume.spacing[:2] == (float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0]))


def test_enhanced_ct_multi_frame_keeps_frame_numbers_and_geometry():
    path = real_file("eCT_Supplemental.dcm")
    ds = dcmread(path)
    volume = load_series([path])
    assert volume.modality == "CT"
    assert volume.voxels.shape == (int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    assert sorted(ref.frame_number for ref in volume.sources) == list(range(1, int(ds.NumberOfFrames) + 1))
    for k, ref in enumerate(volume.sources):  # slice k holds the frame it names, in HU
        groups = ds.PerFrameFunctionalGroupsSequence[ref.frame_number - 1]
        shared = ds.SharedFunctionalGroupsSequence[0]
        lut = (groups if "PixelValueTransformationSequence" in groups else shared).PixelValueTransformationSequence[0]
        expected = ds.pixel_array[ref.frame_number - 1] * float(lut.RescaleSlope) + float(lut.RescaleIntercept)
        np.testing.assert_array_equal(volume.voxels[k], expected.astype(np.float32))


def test_legacy_converted_enhanced_mr_equals_its_single_frames(tmp_path):
    singles, path = write_legacy_enhanced_mr(tmp_path, 5)
    multi, single = load_series([path]), load_series(singles)
    np.testing.assert_array_equal(multi.voxels, single.voxels)
    np.testing.assert_allclose(multi.slice_positions, single.slice_positions)
    assert sorted(ref.frame_number for ref in multi.sources) == [1, 2, 3, 4, 5]


def test_multi_frame_without_geometry_is_refused():
    with pytest.raises(SlicingError, match="no per-frame geometry"):
        load_series([real_file("emri_small.dcm")])


@pytest.mark.parametrize("name", ["emri_small_RLE.dcm", "emri_small_jpeg_ls_lossless.dcm",
                                  "emri_small_jpeg_2k_lossless.dcm", "emri_small_big_endian.dcm"])
def test_compressed_and_big_endian_decode_to_the_same_pixels(name):
    from inference.frames import decode_pixels

    reference = decode_pixels(dcmread(real_file("emri_small.dcm")))
    np.testing.assert_array_equal(decode_pixels(dcmread(real_file(name))), reference)


def test_native_fast_path_matches_pydicom():
    from inference.frames import decode_pixels

    for name in ("CT_small.dcm", "MR_small.dcm", "emri_small.dcm"):
        ds = dcmread(real_file(name))
        np.testing.assert_array_equal(decode_pixels(ds), ds.pixel_array.reshape(decode_pixels(ds).shape))


def test_order_follows_position_not_instance_number_or_file_order(tmp_path):
    numbers = [5, 1, 4, 2, 3]
    paths = write_slices(tmp_path, axial_positions(5), instance_numbers=numbers)
    shuffled = paths[:]
    random.Random(3).shuffle(shuffled)
    volume = load_series(shuffled)
    assert [v[0, 0] for v in volume.voxels] == [-1024 + 100 * k for k in range(5)]
    assert [dcmread(p).SOPInstanceUID for p in paths] == [ref.sop_instance_uid for ref in volume.sources]
    assert volume.spacing[2] == pytest.approx(2.0) and not volume.issues.uneven_spacing


def test_slices_stored_head_first_are_still_ordered_along_the_normal(tmp_path):
    paths = write_slices(tmp_path, axial_positions(4, step=-3.0))
    volume = load_series(paths)
    assert np.all(np.diff(volume.slice_positions) > 0)
    np.testing.assert_allclose(volume.origin, [-10, -20, -19])


def test_localizer_is_dropped(tmp_path):
    positions = axial_positions(4) + [[0.0, 0.0, 0.0]]
    types = [["ORIGINAL", "PRIMARY", "AXIAL"]] * 4 + [["ORIGINAL", "PRIMARY", "LOCALIZER"]]
    paths = write_slices(tmp_path, positions, image_types=types)
    volume = load_series(paths)
    assert len(volume.sources) == 4 and volume.issues.localizers_dropped == 1


def test_lone_frame_in_another_orientation_is_treated_as_localizer(tmp_path):
    series = "1.2.826.0.1.3680043.8.498.1"
    axial = write_slices(tmp_path / "a", axial_positions(6), series_uid=series)
    coronal = write_slices(tmp_path / "c", [[0, 0, 0]], orientation=(1, 0, 0, 0, 0, -1), series_uid=series)
    volume = load_series(axial + coronal)
    assert len(volume.sources) == 6 and volume.issues.localizers_dropped == 1


def test_two_stacks_are_refused_by_load_series_and_split_by_load_stacks(tmp_path):
    series = "1.2.826.0.1.3680043.8.498.2"
    axial = write_slices(tmp_path / "a", axial_positions(5), series_uid=series)
    sagittal = write_slices(tmp_path / "s", [[k * 2.0, 0, 0] for k in range(3)], orientation=(0, 1, 0, 0, 0, -1), series_uid=series)
    with pytest.raises(MultipleStacksError, match="2 stacks"):
        load_series(axial + sagittal)
    stacks = load_stacks(axial + sagittal)
    assert [len(s.sources) for s in stacks] == [5, 3]


def test_multi_phase_duplicate_positions_become_stacks(tmp_path):
    positions = axial_positions(4) * 2
    paths = write_slices(tmp_path, positions, temporal=[1] * 4 + [2] * 4)
    assert [len(s.sources) for s in load_stacks(paths)] == [4, 4]


def test_plain_duplicates_are_dropped_and_counted(tmp_path):
    paths = write_slices(tmp_path, axial_positions(4) + axial_positions(1))
    volume = load_series(paths)
    assert len(volume.sources) == 4 and volume.issues.duplicate_positions == 1


def test_missing_slice_and_uneven_spacing_are_flagged(tmp_path):
    positions = [p for k, p in enumerate(axial_positions(8)) if k != 5]
    volume = load_series(write_slices(tmp_path, positions))
    assert volume.issues.missing_slices == 1 and volume.issues.uneven_spacing
    assert volume.spacing[2] == pytest.approx(2.0)
    assert "about 1 slice(s) missing" in volume.issues.describe()


def test_gantry_tilt_is_refused(tmp_path):
    tilted = [[-10.0, -20.0 + 0.5 * k, -10.0 + 2.0 * k] for k in range(5)]
    with pytest.raises(GantryTiltError, match="gantry tilt"):
        load_series(write_slices(tmp_path, tilted))


def test_unreadable_input_names_the_file(tmp_path):
    bad = tmp_path / "broken.dcm"
    bad.write_bytes(b"not dicom at all")
    with pytest.raises(SlicingError, match="broken.dcm"):
        load_series([bad])
    with pytest.raises(SlicingError, match="no instances"):
        load_series([])


def test_sitk_image_has_the_same_geometry(tmp_path):
    volume = load_series(write_slices(tmp_path, axial_positions(3, step=2.5), spacing=(0.8, 0.6)))
    image = volume.to_sitk()
    assert image.GetSize() == (24, 32, 3)
    np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((0, 0, 2)), volume.slice_origin(2))
    np.testing.assert_allclose(image.GetSpacing(), (0.6, 0.8, 2.5))
