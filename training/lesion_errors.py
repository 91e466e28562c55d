"""Where a checkpoint's lesion figures are lost: each true lesion as the node saw it, and each false one.

The card's figures say how much Dice or sensitivity is missing, not where. Per true lesion this lists its size,
how many of its slices were found (and on how many the model drew it at all, before the slice rule that makes
slice masks a lesion), its Dice, recall and precision against the predicted lesions that overlap it
(paired as the card's figures pair them: ``training.evaluate.pair_lesions``), its contrast with the tissue around it, and whether the
part that was missed is brighter or darker than the part that was found: under-segmented lesions whose
missed part differs in intensity (a bright rim round a dark core found alone) need other training data, lesions
cut at their ends need another slice rule (as do lesions drawn on too few slices to be kept), and a boundary bias all round needs another threshold. Pure
functions of the truth, the predictions and the voxels; ``benchmarks.lesion_errors`` runs them on subjects.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from inference.findings import Lesion, mask_volume_ml
from inference.slicing import Volume
from training.evaluate import GroundTruth, dice_score, pair_lesions

RING_PX = 3  # in-plane width of the surrounding tissue a lesion's contrast is measured against


@dataclass(frozen=True)
class LesionError:
    """One true lesion against what the node reported over it. Intensities in the volume's units (CT: HU)."""

    label: str
    volume_ml: float
    slices: int  # slices the lesion is on
    found_slices: int  # of those, slices where a predicted lesion overlaps it
    drawn_slices: int  # of those, slices where a slice's mask overlaps it, kept in a lesion or not (``drawn``)
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


def lesion_errors(volume: Volume, truth: GroundTruth, predicted: list[Lesion],
                  drawn: np.ndarray | None = None) -> tuple[list[LesionError], list[FalseLesion]]:
    """Each true lesion of ``truth`` against ``predicted`` (the node's 3D lesions on ``volume``), and the
    predicted lesions that are false positives, as ``training.evaluate.score_lesions`` counts them. ``drawn``:
    every slice's masks on ``volume``'s grid before aggregation, which tells a lesion the model never drew from
    one its slice rule dropped (without it, the slices drawn are taken to be the slices found)."""
    overlapping, false = pair_lesions(truth, [lesion.mask for lesion in predicted])
    errors = []
    for mask, paired in zip(truth.lesions, overlapping):
        union = np.any([predicted[i].mask for i in paired], axis=0) if paired else np.zeros(mask.shape, bool)
        found = mask & union
        found_slices = int(found.any(axis=(1, 2)).sum())
        errors.append(LesionError(
            label=_label(truth, mask),
            volume_ml=round(mask_volume_ml(volume, mask), 3),
            slices=int(mask.any(axis=(1, 2)).sum()),
            found_slices=found_slices,
            drawn_slices=found_slices if drawn is None else int((mask & drawn).any(axis=(1, 2)).sum()),
            dice=dice_score(union, mask),
            recall=int(found.sum()) / int(mask.sum()),
            precision=int(found.sum()) / int(union.sum()) if paired else float("nan"),
            contrast=contrast(volume.voxels, mask),
            missed_minus_found=_mean(volume.voxels, mask & ~union) - _mean(volume.voxels, found),
        ))
    wrong = [FalseLesion(lesion.label, round(lesion.volume_ml, 3), lesion.slice_count, lesion.slice_range[0],
                         contrast(volume.voxels, lesion.mask))
             for lesion, is_false in zip(predicted, false) if is_false]
    return errors, wrong


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
