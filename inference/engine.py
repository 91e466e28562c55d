"""The engine: one Volume in, 3D lesions out, with a bounded number of slices in flight.

Steps: scope check (a series the model was not trained for is "not assessed", never "no findings");
model input through the shared pipeline; slices with no body in them skipped; the rest in batches of
``batch_size`` through the model (greedy answer, plus sampled answers on slices with a finding for
reliability); masks mapped back to each source image's pixel grid by the pipeline's inverse; findings
joined into lesions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

from inference.findings import Lesion, SliceFinding, aggregate
from inference.model.detail import context_indices
from inference.model.protocol import (GroundedModel, Interpretation, aligned_lesion_overlap, min_lesion_slices,
                                      recognition_question)
from inference.preprocess import SlicePreparer, SliceTransform
from inference.reliability import level, uncertainty
from inference.slicing import Volume

logger = logging.getLogger(__name__)

Observer = Callable[[int, Interpretation, SliceTransform], None]


class Assessment(str, Enum):
    ASSESSED = "assessed"
    NOT_ASSESSED = "not assessed"


@dataclass(frozen=True)
class EngineConfig:
    batch_size: int = 8  # slices per model call: bounds memory (a 256x64x64 embedding is 4 MB per slice)
    min_body_fraction: float = 0.02  # slices with less body than this are not interpreted
    min_volume_ml: float = 0.05  # smaller 3D components are dropped
    question: str | None = None  # default: UniBiomed's grounded-recognition question for the modality
    target: str = ""  # for targeted segmentation: the label of an answer's bare [SEG]
    seed: int = 0


@dataclass
class SeriesResult:
    assessment: Assessment
    reason: str
    lesions: list[Lesion]
    model_version: str
    question: str = ""
    slices_interpreted: int = 0
    slices_skipped: int = 0
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def has_findings(self) -> bool:
        return self.assessment is Assessment.ASSESSED and bool(self.lesions)


def interpret_volume(volume: Volume, model: GroundedModel, config: EngineConfig = EngineConfig(),
                     body_part: str = "", observe: Observer | None = None) -> SeriesResult:
    """Interpret every slice with body in it; ``observe`` sees each slice's interpretation (evaluation)."""
    if not model.scope.covers(volume.modality, body_part):
        reason = (f"{volume.modality or 'unknown modality'}{' ' + body_part if body_part else ''} is outside the "
                  f"model's scope ({', '.join(model.scope.modalities)}{'; ' + ', '.join(model.scope.body_parts) if model.scope.body_parts else ''})")
        return SeriesResult(Assessment.NOT_ASSESSED, reason, [], model.version)
    question = config.question or recognition_question(volume.modality)
    started = time.perf_counter()
    preparer = SlicePreparer(volume, size=model.input_size, normalization=model.normalization)
    prepared = time.perf_counter()
    selected = np.flatnonzero(preparer.body_fraction >= config.min_body_fraction)
    findings: list[SliceFinding] = []
    context = getattr(model, "context_slices", 0)  # neighbours each side a 2.5D model sees with each slice
    for start in range(0, len(selected), config.batch_size):
        batch = selected[start:start + config.batch_size]
        extra = {"context": _with_neighbours(preparer, batch, context)} if context else {}
        interpretations = model.interpret(preparer.images(batch), question, samples=model.reliability.samples,
                                          temperature=model.reliability.temperature, seed=config.seed + start, **extra)
        for k, interpretation in zip(batch.tolist(), interpretations):
            if observe is not None:
                observe(k, interpretation, preparer.transform)
            findings.extend(_slice_findings(k, interpretation, preparer.transform, model, config))
    interpreted = time.perf_counter()
    lesions = aggregate(volume, findings, config.min_volume_ml, min_lesion_slices(model, volume.modality),
                        aligned_lesion_overlap(model, volume.modality), model.reliability)
    done = time.perf_counter()
    skipped = len(volume.sources) - len(selected)
    logger.info("series %s: %d slices interpreted, %d skipped, %d lesions", volume.series_instance_uid,
                len(selected), skipped, len(lesions))
    return SeriesResult(
        Assessment.ASSESSED, "", lesions, model.version, question, len(selected), skipped,
        {"prepare": prepared - started, "model": interpreted - prepared, "aggregate": done - interpreted},
    )


def _with_neighbours(preparer: SlicePreparer, batch: np.ndarray, context: int) -> np.ndarray:
    """(n, 2 * context + 1, size, size): each slice of ``batch`` between its neighbours (the edge slice
    repeated past either end), slices with no body included: they are what lies above and below."""
    count = len(preparer.body_fraction)
    indices = np.array([context_indices(int(k), count, context) for k in batch])
    images = preparer.images(indices.ravel())
    return images.reshape(*indices.shape, *images.shape[1:])


def _slice_findings(k: int, interpretation: Interpretation, transform: SliceTransform, model: GroundedModel,
                    config: EngineConfig) -> list[SliceFinding]:
    answer = interpretation.answer
    if not len(answer.masks):
        return []
    doubt = uncertainty(interpretation, model.reliability)
    reliability = level(doubt, model.reliability)
    source_masks = transform.mask_to_source(answer.masks)
    labels = answer.findings + [""] * (len(answer.masks) - len(answer.findings))
    return [
        SliceFinding(k, label or config.target or "Finding", mask, float(score), reliability, doubt, answer.text)
        for label, mask, score in zip(labels, source_masks, answer.scores)
        if mask.any()
    ]
