"""Per-slice findings joined into 3D lesions, measured in the volume's real geometry.

For each finding label, the slice masks (already on the source pixel grid) are stacked into a (z, y, x)
mask and split into connected components (26-connected) by SimpleITK. Each lesion gets its volume in mL
(voxel count times in-plane pixel area times the slice thickness it occupies, from the true slice positions,
so uneven spacing is measured correctly), its largest axial diameter in mm, its slice range, the source
instances it touches, and a reliability from its slices' under the card's lesion rule (inference.reliability:
the worst level, or the median uncertainty's), with the mean predicted mask IoU.
Components smaller than ``min_volume_ml``, or on fewer slices than the model's ``min_lesion_slices``, are dropped,
unless the model's ``aligned_lesion_overlap`` keeps a short one whose slice masks lie on top of each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from inference.model.card import ReliabilityPolicy
from inference.reliability import Reliability, capped, lesion_level
from inference.slicing import SliceRef, Volume


@dataclass(frozen=True)
class SliceFinding:
    """One finding on one slice: ``mask`` (rows, columns) bool on the source grid."""

    slice_index: int
    label: str
    mask: np.ndarray
    score: float
    reliability: Reliability
    uncertainty: float = float("nan")  # under the card's reliability policy (inference.reliability)
    text: str = ""


@dataclass
class Lesion:
    label: str
    mask: np.ndarray  # (z, y, x) bool on the volume grid
    volume_ml: float
    largest_axial_diameter_mm: float
    slice_range: tuple[int, int]  # first and last slice index, inclusive
    sources: list[SliceRef]
    reliability: Reliability
    mean_score: float
    texts: list[str] = field(default_factory=list)

    @property
    def slice_count(self) -> int:
        return len(self.sources)  # one per slice the lesion touches


def aggregate(volume: Volume, findings: list[SliceFinding], min_volume_ml: float = 0.05,
              min_slices: int = 1, aligned_overlap: float | None = None,
              policy: ReliabilityPolicy | None = None) -> list[Lesion]:
    """3D lesions, largest first; a component seen on fewer than ``min_slices`` slices is dropped (a model's
    operating point: a real lesion in 5 mm slices usually spans two, a spot on one slice is mostly noise),
    unless ``aligned_overlap`` is set and it spans at least two slices whose masks are aligned (``aligned``):
    a small compact lesion on two thick slices is seen in the same place on both, where the false findings a
    slice rule removes (organ tips in partial volume, gas) mostly shift or change shape between slices.
    ``policy``: the card's, whose lesion rule rates each lesion (none: its worst slice's level) and whose
    ``short_lesion_cap`` bounds the level of a short one kept for its alignment."""
    lesions: list[Lesion] = []
    for label in sorted({f.label for f in findings}):
        of_label = [f for f in findings if f.label == label]
        stacked = np.zeros(volume.voxels.shape, dtype=bool)
        for f in of_label:
            stacked[f.slice_index] |= f.mask
        components = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray(stacked.astype(np.uint8)), True))
        for number in range(1, int(components.max()) + 1):
            mask = components == number
            lesion = _lesion(volume, label, mask, of_label, policy)
            short = lesion.slice_count < min_slices
            long_enough = not short or (
                aligned_overlap is not None and lesion.slice_count >= 2 and aligned(mask, aligned_overlap))
            if lesion.volume_ml >= min_volume_ml and long_enough:
                if short and policy is not None:
                    lesion.reliability = capped(lesion.reliability, policy.short_lesion_cap)
                lesions.append(lesion)
    return sorted(lesions, key=lambda l: -l.volume_ml)


def _lesion(volume: Volume, label: str, mask: np.ndarray, findings: list[SliceFinding],
            policy: ReliabilityPolicy | None) -> Lesion:
    slices = np.flatnonzero(mask.any(axis=(1, 2)))
    volume_ml = mask_volume_ml(volume, mask)
    touching = [f for f in findings if f.slice_index in set(slices.tolist()) and (f.mask & mask[f.slice_index]).any()]
    return Lesion(
        label=label,
        mask=mask,
        volume_ml=volume_ml,
        largest_axial_diameter_mm=max(largest_diameter_mm(mask[k], volume.spacing[:2]) for k in slices),
        slice_range=(int(slices[0]), int(slices[-1])),
        sources=[volume.sources[k] for k in slices],
        reliability=lesion_level([f.reliability for f in touching], [f.uncertainty for f in touching], policy),
        mean_score=float(np.mean([f.score for f in touching])) if touching else 0.0,
        texts=sorted({f.text for f in touching if f.text}),
    )


def aligned(mask: np.ndarray, overlap: float) -> bool:
    """Whether every two consecutive slices of a (z, y, x) mask overlap in-plane by at least ``overlap`` of the
    smaller of their two masks (1.0: one lies wholly inside the other)."""
    slices = np.flatnonzero(mask.any(axis=(1, 2)))
    for a, b in zip(slices[:-1], slices[1:]):
        smaller = min(int(mask[a].sum()), int(mask[b].sum()))
        if b != a + 1 or (mask[a] & mask[b]).sum() < overlap * smaller:
            return False
    return True


def mask_volume_ml(volume: Volume, mask: np.ndarray) -> float:
    """The volume of a 3D mask of ``volume`` in ml, each slice as thick as its share of the gaps."""
    thickness = _slice_thickness(volume)
    pixel_area = volume.spacing[0] * volume.spacing[1]
    return float(sum(mask[k].sum() * pixel_area * thickness[k] for k in np.flatnonzero(mask.any(axis=(1, 2)))) / 1000.0)


def _slice_thickness(volume: Volume) -> np.ndarray:
    """Per slice, half the distance to each neighbour (the median spacing at the ends)."""
    positions = volume.slice_positions
    if len(positions) < 2:
        return np.array([volume.spacing[2]])
    gaps = np.diff(positions)
    before = np.concatenate([[volume.spacing[2]], gaps])
    after = np.concatenate([gaps, [volume.spacing[2]]])
    return (before + after) / 2


def largest_diameter_mm(mask: np.ndarray, spacing_xy: tuple[float, float]) -> float:
    """Largest distance between two pixels of a slice mask, in mm (pixel extents included)."""
    rows, columns = np.nonzero(mask)
    if len(rows) == 0:
        return 0.0
    points = np.column_stack([columns * spacing_xy[0], rows * spacing_xy[1]])
    if len(points) > 2000:  # only the outline can hold the farthest pair
        points = points[_outline(mask)[rows, columns]]
    distances = np.sqrt(((points[:, None, :] - points[None, :, :]) ** 2).sum(-1))
    return float(distances.max() + min(spacing_xy))


def _outline(mask: np.ndarray) -> np.ndarray:
    padded = np.pad(mask, 1)
    interior = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~interior
