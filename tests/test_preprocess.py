"""Model input and its inverse: normalisation, aspect-preserving resize, and exact mask round trips."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from inference.preprocess import Normalization, SliceTransform, prepare
from inference.slicing import load_series
from tests.synthetic import axial_positions, write_slices

shapes = st.tuples(st.integers(1, 600), st.integers(1, 600))
spacings = st.tuples(st.floats(0.2, 5.0), st.floats(0.2, 5.0))
sizes = st.sampled_from([64, 128, 256])


@settings(max_examples=300, deadline=None)
@given(shape=shapes, spacing=spacings, size=sizes)
def test_each_axis_round_trips_from_the_finer_grid(shape, spacing, size):
    """Along every axis, finer grid -> coarser grid -> finer grid is the identity."""
    t = SliceTransform.fit(shape, spacing, size)
    for axis in (0, 1):
        to_model, to_source = t.model_index(axis), t.source_index(axis)
        if t.scale[axis] >= 1:  # model grid finer: every source pixel comes back to itself
            assert np.array_equal(to_source[to_model], np.arange(shape[axis]))
        else:  # source grid finer: every model pixel inside the image comes back to itself
            inside = np.flatnonzero(to_source >= 0)
            assert np.array_equal(to_model[to_source[inside]], inside)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), size=sizes)
def test_model_mask_comes_back_to_the_source_and_again_unchanged(data, size):
    """A CT-like case (source finer than the model): a mask the model draws survives the round trip."""
    rows, columns = data.draw(st.integers(size, 3 * size)), data.draw(st.integers(size, 3 * size))
    spacing = data.draw(st.floats(0.3, 1.5))
    t = SliceTransform.fit((rows, columns), (spacing, spacing), size)
    mask = data.draw(arrays(np.bool_, (1, size, size)))
    inside = np.zeros_like(mask)
    r, c = t.source_index(0) >= 0, t.source_index(1) >= 0
    inside[:, r[:, None] & c[None, :]] = True
    mask &= inside
    back = t.mask_to_source(mask)
    assert back.shape == (1, rows, columns)
    assert np.array_equal(t.mask_to_model(back), mask)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), size=sizes)
def test_source_mask_survives_when_the_model_grid_is_finer(data, size):
    """An MR-like case (small matrix): a ground-truth mask goes to the model grid and back unchanged."""
    rows, columns = data.draw(st.integers(1, size)), data.draw(st.integers(1, size))
    spacing = data.draw(st.floats(0.5, 3.0))
    t = SliceTransform.fit((rows, columns), (spacing, spacing), size)
    mask = data.draw(arrays(np.bool_, (1, rows, columns)))
    assert np.array_equal(t.mask_to_source(t.mask_to_model(mask)), mask)


def test_aspect_ratio_is_kept_in_millimetres():
    t = SliceTransform.fit((400, 200), (0.5, 1.0), 256)  # 200 mm x 200 mm: a square
    assert t.scale == pytest.approx((0.64, 1.28)) and t.offset == (0, 0)
    t = SliceTransform.fit((256, 512), (1.0, 1.0), 256)  # 256 x 512 mm: padded top and bottom
    assert t.scale == (0.5, 0.5) and t.offset == (64, 0)


def test_image_resize_keeps_a_uniform_image_uniform_and_pads_with_zero():
    t = SliceTransform.fit((100, 200), (1.0, 1.0), 64)
    out = t.image_to_model(np.full((2, 100, 200), 0.7, dtype=np.float32))
    assert out.shape == (2, 64, 64)
    assert np.allclose(out[:, t.offset[0] + 1:t.offset[0] + 30, :], 0.7)
    assert np.all(out[:, : t.offset[0] - 1] == 0) and np.all(out[:, -t.offset[0] + 1:] == 0)


def test_ct_window_and_mr_percentiles(tmp_path):
    ct = load_series(write_slices(tmp_path / "ct", axial_positions(3)))  # values -1024 + 100k + column
    normalized = Normalization(ct_window=(-1000.0, 100.0)).apply(ct)  # maps -1050 HU to 0 and -950 HU to 1
    np.testing.assert_allclose(normalized[0, 0, [0, 10]], [(-1024 + 1050) / 100, (-1014 + 1050) / 100], rtol=1e-6)
    assert np.all(normalized[1:] == 1.0)  # -924 HU and above: clipped
    assert np.all(Normalization(ct_window=(-2000.0, 100.0)).apply(ct) == 1.0)
    mr = load_series(write_slices(tmp_path / "mr", axial_positions(3), modality="MR"))
    low, high = Normalization().intensity_range(mr)
    assert mr.voxels.min() <= low < high <= mr.voxels.max()


def test_prepare_gives_model_ready_slices(tmp_path):
    volume = load_series(write_slices(tmp_path, axial_positions(5), rows=40, columns=60))
    model_input = prepare(volume, size=32, chunk=2)
    assert model_input.images.shape == (5, 32, 32) and model_input.images.dtype == np.float32
    assert 0.0 <= model_input.images.min() and model_input.images.max() <= 1.0
    assert model_input.body_fraction.shape == (5,)
