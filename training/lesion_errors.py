"""Where a checkpoint's lesion figures are lost: each true lesion as the node saw it, and each false one.

The card's figures say how much Dice or sensitivity is missing, not where. Per true lesion this lists its size,
how many of its slices were found, its Dice, recall and precision against the predicted lesions that overlap it
(as ``training.evaluate.score_lesions`` pairs them), its contrast with the tissue around it, and whether the
part that was missed is brighter or darker than the part that was found: under-segmented lesions whose
missed part differs in intensity (a bright rim round a dark core found alone) need other training data, lesions
cut at their ends need another slice rule, and a boundary bias all round needs another threshold. Pure
functions of the truth, the predictions and the voxels; ``benchmarks.lesion_errors`` runs them on subjects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from inference.findings import Lesion, mask_volume_ml
from inference.slicing import Volume
from training.evaluate import GroundTruth

RING_PX = 3  # in-plane width of the surrounding tissue a lesion's contrast is measured against


@dataclass(frozen=True)
class LesionError:
    """One true lesion against what the node reported over it. Intensities in the volume's units (CT: HU)."""

    label: str
    volume_ml: float
    slices: int  # slices the lesion is on
    found_slices: int  # of those, slices where a predicted lesion overlaps it
    dice: float  # 0.0 where missed
    recall: float  # share of the lesion's voxels inside the overlapping predictions
    precision: float  # share of the overlapping predictions' voxels inside the lesion; nan where missed
    contrast: float  # mean inside the lesion minus mean of a ring of RING_PX pixels round it, slice by slice
    missed_minus_found: float  # mean of the missed voxels minus mean of the found ones; nan unless both exist

    @property
    def detected(self) -> bool:
        return self.found_slices > 0


@dataclass(frozen=True)
class FalseLesion:
    """A reported lesion that overlaps no true lesion (nor a speck too small to report)."""

    label: str
    volume_ml: float
    slices: int
    first_slice: int
    contrast: float


def lesion_errors(volume: Volume, truth: GroundTruth, predicted: list[Lesion]) -> tuple[list[LesionError], list[FalseLesion]]:
    """Each true lesion of ``truth`` against ``predicted`` (the node's 3D lesions on ``volume``), and the
    predicted lesions that are false positives, as ``score_lesions`` counts them."""
    errors = []
    for mask in truth.lesions:
        overlapping = [p.mask for p in predicted if (p.mask & mask).any()]
        union = np.any(overlapping, axis=0) if overlapping else np.zeros(mask.shape, bool)
        found, inside = mask & union, int((mask & union).sum())
        errors.append(LesionError(
            label=_label(truth, mask),
            volume_ml=round(mask_volume_ml(volume, mask), 3),
            slices=int(mask.any(axis=(1, 2)).sum()),
            found_slices=int(found.any(axis=(1, 2)).sum()),
            dice=2 * inside / (int(mask.sum()) + int(union.sum())),
            recall=inside / int(mask.sum()),
            precision=inside / int(union.sum()) if overlapping else float("nan"),
            contrast=contrast(volume.voxels, mask),
            missed_minus_found=_mean(volume.voxels, mask & ~union) - _mean(volume.voxels, found),
        ))
    hit = [lesion for lesion in predicted
           if any((lesion.mask & m).any() for m in truth.lesions) or any((lesion.mask & s).any() for s in truth.specks)]
    false = [FalseLesion(lesion.label, round(lesion.volume_ml, 3), lesion.slice_count, lesion.slice_range[0],
                         contrast(volume.voxels, lesion.mask))
             for lesion in predicted if not any(lesion is h for h in hit)]
    return errors, false


def contrast(voxels: np.ndarray, mask: np.ndarray) -> float:
    """Mean inside ``mask`` minus the mean of an in-plane ring of RING_PX pixels round it (on its slices)."""
    ring = np.zeros(mask.shape, bool)
    for k in np.flatnonzero(mask.any(axis=(1, 2))):
        ring[k] = ndimage.binary_dilation(mask[k], iterations=RING_PX) & ~mask[k]
    return _mean(voxels, mask) - _mean(voxels, ring)


def _mean(voxels: np.ndarray, mask: np.ndarray) -> float:
    return float(voxels[mask].mean()) if mask.any() else float("nan")


def _label(truth: GroundTruth, lesion: np.ndarray) -> str:
    """The finding label that covers most of the lesion."""
    return max(truth.labels, key=lambda label: int((truth.labels[label] & lesion).sum()), default="")
