"""Choosing a model's operating point on validation subjects, never on the held-out ones that the card reports.

The operating point is what turns the decoder's masks into reported lesions: the probability above which a
pixel is in a mask (``mask_threshold``: each value needs its own pass), the smallest first mask that
makes a slice's answer a finding (``min_mask_pixels``, in model-grid pixels; with ``decision = "decoder"``
the first mask is the decoder's answer to the "It is [SEG]" query), the least presence probability of that
first mask (``presence_threshold``, for models with ``presence``), the fewest slices a 3D lesion must
span (``min_lesion_slices``, per modality) and the slice overlap that keeps a shorter lesion of at least two
aligned slices (``aligned_lesion_overlap``, per modality; None: none is kept). One engine pass per series
at the loosest point (1 pixel, presence 0, 1 slice) records every slice's findings and the size and presence
of its first mask; any stricter point is then a filter on those, scored as ``training.evaluate`` scores the
held-out split.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from inference.engine import EngineConfig, interpret_volume
from inference.findings import SliceFinding, aggregate
from inference.model.builtin import BuiltinModel
from inference.model.protocol import Interpretation
from inference.preprocess import SliceTransform
from inference.slicing import Volume, load_series
from training.cache import CachedEncoderModel, EmbeddingCache
from training.evaluate import GroundTruth, body_part, read_truth, score_lesions, slice_output, slice_reference
from training.sources import LabeledSeries


@dataclass
class SeriesPass:
    """One series interpreted at the loosest operating point, with its ground truth."""

    modality: str
    volume: Volume
    truth: GroundTruth
    findings: list[SliceFinding]
    first_mask_pixels: dict[int, int]  # slice -> model-grid pixels of its answer's first mask
    mask_threshold: float = 0.5
    first_presence: dict[int, float] = field(default_factory=dict)  # slice -> its first mask's presence probability


@dataclass(frozen=True)
class PointScore:
    modality: str
    mask_threshold: float
    min_mask_pixels: int
    min_lesion_slices: int
    presence_threshold: float
    sensitivity: float
    false_positives_per_volume: float
    mean_dice_detected: float
    finding_accuracy: float
    aligned_overlap: float | None = None


@contextmanager
def _loosest(model: BuiltinModel, mask_threshold: float) -> Iterator[None]:
    """The model at 1 pixel, presence 0 and 1 slice, ``mask_threshold`` for every modality, without reliability
    samples (they do not change the findings)."""
    network = model.network
    saved = network.config, model.min_lesion_slices, model.aligned_lesion_overlap, model.mask_threshold, model.reliability
    network.config = dataclasses.replace(network.config, min_mask_pixels=1, mask_threshold=mask_threshold,
                                         presence_threshold=0.0)
    model.min_lesion_slices, model.aligned_lesion_overlap, model.mask_threshold = 1, None, None
    model.reliability = dataclasses.replace(model.reliability, samples=0)
    try:
        yield
    finally:
        (network.config, model.min_lesion_slices, model.aligned_lesion_overlap, model.mask_threshold,
         model.reliability) = saved


def loosest_passes(items: list[LabeledSeries], model: BuiltinModel, cache: EmbeddingCache | None = None,
                   mask_threshold: float = 0.5, config: EngineConfig = EngineConfig()) -> list[SeriesPass]:
    """Interpret each series at the loosest operating point for ``mask_threshold`` (encoder outputs from
    ``cache`` where given)."""
    engine_model = CachedEncoderModel(model, cache) if cache is not None else model
    passes = []
    with _loosest(model, mask_threshold):
        for item in items:
            volume = load_series(item.series)
            truth = read_truth(item, volume, config.min_volume_ml)
            first: dict[int, int] = {}
            presence: dict[int, float] = {}

            def observe(k: int, interpretation: Interpretation, _transform: SliceTransform) -> None:
                masks = interpretation.answer.masks
                first[k] = int(masks[0].sum()) if len(masks) else 0
                if len(masks) and model.network.config.presence:
                    presence[k] = float(interpretation.answer.scores[0])

            result = interpret_volume(volume, engine_model, config, body_part(item), observe=observe)
            # Single-slice lesions of one label are each their own component: re-split them into slice findings.
            findings = [SliceFinding(k, lesion.label, lesion.mask[k], lesion.mean_score, lesion.reliability)
                        for lesion in result.lesions for k in range(lesion.slice_range[0], lesion.slice_range[1] + 1)
                        if lesion.mask[k].any()]
            passes.append(SeriesPass(volume.modality, volume, truth, findings, first, mask_threshold, presence))
    return passes


def score_point(passes: list[SeriesPass], modality: str, min_mask_pixels: int, min_lesion_slices: int,
                presence_threshold: float = 0.0, min_volume_ml: float = EngineConfig.min_volume_ml,
                aligned_overlap: float | None = None) -> PointScore:
    true_lesions = detected = false_positives = 0
    dice: list[float] = []
    right = slices = 0
    chosen = [p for p in passes if p.modality == modality]
    for series in chosen:
        kept = [f for f in series.findings if series.first_mask_pixels.get(f.slice_index, 0) >= min_mask_pixels
                and series.first_presence.get(f.slice_index, 0.0) >= presence_threshold]
        lesions = aggregate(series.volume, kept, min_volume_ml, min_lesion_slices, aligned_overlap)
        score = score_lesions(series.truth, [lesion.mask for lesion in lesions])
        true_lesions, detected = true_lesions + score.true_lesions, detected + score.detected
        false_positives += score.false_positives
        dice += score.dice
        for k in range(series.volume.voxels.shape[0]):
            right += slice_reference(series.truth, k) == slice_output(lesions, k)
            slices += 1
    threshold = chosen[0].mask_threshold if chosen else float("nan")
    return PointScore(modality, threshold, min_mask_pixels, min_lesion_slices, presence_threshold,
                      round(detected / true_lesions, 4) if true_lesions else float("nan"),
                      round(false_positives / max(len(chosen), 1), 4),
                      round(float(np.mean(dice)), 4) if dice else float("nan"),
                      round(right / max(slices, 1), 4), aligned_overlap)


def choose(scores: list[PointScore], max_false_positives: float) -> PointScore:
    """The most sensitive point within the false-positive budget (then the one with the fewest false positives,
    then the most accurate, then the loosest); if none is within it, the point with the fewest false positives."""
    within = [s for s in scores if s.false_positives_per_volume <= max_false_positives]
    if within:
        return max(within, key=lambda s: (s.sensitivity, -s.false_positives_per_volume, s.finding_accuracy,
                                          s.mean_dice_detected, -s.min_lesion_slices,
                                          -s.min_mask_pixels, -s.presence_threshold, -_strictness(s.aligned_overlap)))
    return min(scores, key=lambda s: (s.false_positives_per_volume, -s.sensitivity))


def _strictness(aligned_overlap: float | None) -> float:
    """How few short lesions an aligned-overlap rule keeps: none at all without the rule."""
    return 2.0 if aligned_overlap is None else aligned_overlap
