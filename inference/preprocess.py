"""Model input: modality normalisation, aspect-preserving resize to a square, and its exact inverse.

The model sees every slice as ``size`` x ``size`` pixels. The slice is scaled so that its physical extent
(rows x row spacing, columns x column spacing) fits the square with the aspect ratio kept, and centred
with zero padding; the padding is a whole number of model pixels on each side.

Masks move between the grids by pixel-centre sampling (each pixel takes the value of the pixel of the
other grid that contains its centre). With whole-pixel padding this is exact in the sense that matters:
along each axis, going from the finer grid to the coarser one and back returns every pixel to where it was.
So a model mask (model grid coarser than a 512-pixel CT) comes back to the source and, resampled again,
is identical, and a mask drawn on a small MR image (model grid finer) survives the round trip unchanged.
``tests/test_preprocess.py`` checks both for any shape and spacing with hypothesis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from inference.slicing import Volume


@dataclass(frozen=True)
class Normalization:
    """How slices become [0, 1] intensities; stored in a model's card so training and inference agree."""

    ct_window: tuple[float, float] = (40.0, 400.0)  # level, width in HU (soft tissue)
    mr_percentiles: tuple[float, float] = (0.5, 99.5)  # clip to these percentiles of the whole volume

    def apply(self, volume: Volume) -> np.ndarray:
        """(z, y, x) float32 in [0, 1]."""
        low, high = self.intensity_range(volume)
        return self.apply_range(volume.voxels, low, high)

    def intensity_range(self, volume: Volume) -> tuple[float, float]:
        """The modality values mapped to 0 and 1 for this volume."""
        if volume.modality == "CT":
            level, width = self.ct_window
            return level - width / 2, level + width / 2
        sample = volume.voxels[:, ::4, ::4]  # percentiles of a subsample: same answer, a sixteenth of the work
        low, high = (float(v) for v in np.percentile(sample, self.mr_percentiles))
        return low, high

    @staticmethod
    def apply_range(voxels: np.ndarray, low: float, high: float) -> np.ndarray:
        out = np.subtract(voxels, np.float32(low), dtype=np.float32)
        out *= np.float32(1.0 / max(high - low, 1e-6))
        return np.clip(out, 0.0, 1.0, out=out)


@dataclass(frozen=True)
class SliceTransform:
    """Source (rows, columns) grid to the model's square grid: model = offset + scale * source (edges)."""

    source_shape: tuple[int, int]
    size: int
    scale: tuple[float, float]  # model pixels per source pixel, (rows, columns)
    offset: tuple[int, int]  # model pixels of padding before the image, (rows, columns)

    @classmethod
    def fit(cls, source_shape: tuple[int, int], spacing: tuple[float, float], size: int) -> SliceTransform:
        """``spacing`` is (row spacing, column spacing) in mm: the physical aspect ratio is kept."""
        rows, columns = source_shape
        height, width = rows * spacing[0], columns * spacing[1]
        mm_per_pixel = max(height, width) / size
        scale = (spacing[0] / mm_per_pixel, spacing[1] / mm_per_pixel)
        # Whole pixels of padding, never negative (rounding can make the long side 256.0000001 pixels).
        offset = (max(0, int((size - rows * scale[0] + 1e-6) // 2)), max(0, int((size - columns * scale[1] + 1e-6) // 2)))
        return cls((rows, columns), size, scale, offset)

    def source_index(self, axis: int) -> np.ndarray:
        """For each model pixel along ``axis``, the source pixel containing its centre (-1 outside)."""
        centres = (np.arange(self.size) + 0.5 - self.offset[axis]) / self.scale[axis]
        index = np.floor(centres).astype(np.int64)
        index[(index < 0) | (index >= self.source_shape[axis])] = -1
        return index

    def model_index(self, axis: int) -> np.ndarray:
        """For each source pixel along ``axis``, the model pixel containing its centre."""
        centres = self.offset[axis] + self.scale[axis] * (np.arange(self.source_shape[axis]) + 0.5)
        return np.minimum(np.floor(centres).astype(np.int64), self.size - 1)

    def image_to_model(self, images: np.ndarray) -> np.ndarray:
        """(n, rows, columns) float images to (n, size, size), bilinear, zero padding."""
        out = _linear_along(images, self, axis=0)
        return _linear_along(out, self, axis=1)

    def mask_to_model(self, masks: np.ndarray) -> np.ndarray:
        """(n, rows, columns) bool to (n, size, size) bool by pixel-centre sampling."""
        r, c = self.source_index(0), self.source_index(1)
        out = masks[:, np.maximum(r, 0)][:, :, np.maximum(c, 0)]
        out[:, r < 0] = False
        out[:, :, c < 0] = False
        return out

    def mask_to_source(self, masks: np.ndarray) -> np.ndarray:
        """(n, size, size) model masks (bool) back to (n, rows, columns) on the source pixel grid."""
        return masks[:, self.model_index(0)][:, :, self.model_index(1)]


def _linear_along(images: np.ndarray, transform: SliceTransform, axis: int) -> np.ndarray:
    """Linear interpolation along one image axis (1 = rows, 2 = columns of the (n, r, c) array)."""
    n_source = transform.source_shape[axis]
    centres = (np.arange(transform.size) + 0.5 - transform.offset[axis]) / transform.scale[axis] - 0.5
    inside = (centres > -1.0) & (centres < n_source)
    low = np.clip(np.floor(centres).astype(np.int64), 0, n_source - 1)
    high = np.clip(low + 1, 0, n_source - 1)
    weight = np.clip(centres - np.floor(centres), 0.0, 1.0).astype(np.float32)
    weight = np.where(centres < 0, 0.0, weight).astype(np.float32)
    take = 1 + axis
    shape = [1, 1, 1]
    shape[take] = transform.size
    w = weight.reshape(shape)
    out = np.take(images, low, axis=take) * (1 - w) + np.take(images, high, axis=take) * w
    mask = inside.reshape(shape)
    return np.where(mask, out, np.float32(0)).astype(np.float32, copy=False)


@dataclass(frozen=True)
class ModelInput:
    """What the model gets for one volume: (n, size, size) float32 in [0, 1] and the shared transform."""

    images: np.ndarray
    transform: SliceTransform
    body_fraction: np.ndarray  # per slice, the share of pixels above the body threshold (0 = empty slice)


class SlicePreparer:
    """Model input for any slices of a volume, on demand: the engine asks for one batch at a time, so no
    more than a batch of model-ready slices exists at once. Intensity range and transform are fixed for
    the whole volume (an MR's percentiles come from all its slices)."""

    def __init__(self, volume: Volume, size: int = 256, normalization: Normalization = Normalization()) -> None:
        self.volume = volume
        self.low, self.high = normalization.intensity_range(volume)
        self.transform = SliceTransform.fit(volume.voxels.shape[1:], (volume.spacing[1], volume.spacing[0]), size)
        sample = Normalization.apply_range(volume.voxels[:, ::4, ::4], self.low, self.high)
        self.body_fraction = (sample > 0.05).mean(axis=(1, 2)).astype(np.float32)

    def images(self, indices: np.ndarray | slice) -> np.ndarray:
        """(n, size, size) float32 in [0, 1] for the slices at ``indices``."""
        return self.transform.image_to_model(Normalization.apply_range(self.volume.voxels[indices], self.low, self.high))


def prepare(volume: Volume, size: int = 256, normalization: Normalization = Normalization(),
            chunk: int = 32) -> ModelInput:
    """Every slice of ``volume`` for a model with ``size`` x ``size`` input (training builds its samples so).

    Works through ``chunk`` slices at a time so that no full-volume float temporary is ever made.
    """
    preparer = SlicePreparer(volume, size, normalization)
    n = volume.voxels.shape[0]
    images = np.empty((n, size, size), dtype=np.float32)
    for start in range(0, n, chunk):
        images[start:start + chunk] = preparer.images(slice(start, start + chunk))
    return ModelInput(images=images, transform=preparer.transform, body_fraction=preparer.body_fraction)
