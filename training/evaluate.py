"""Evaluation on held-out subjects, through the node's own engine: what a hospital would see.

Per series: the engine interprets the volume exactly as for a received series (the encoder's outputs come
from the cache); an observer records every slice's answer. Against the ground-truth SEG:
- slice level: finding accuracy (the set of findings on the slice equals the reference's), on what the node
  sends (its 3D lesions, i.e. the SEG's segments: after single-slice spots and specks are dropped) and on the
  model's raw per-slice answers (``answer_finding_accuracy``); Dice of the answers' masks on slices where the
  truth has a finding; BLEU-1 / METEOR / ROUGE-L of the answer text against the reference answer
  ("It is [SEG]. Brain tumor." or "No findings.");
- lesion level (3D): a true lesion (a tracked segment, i.e. one with a Tracking UID, with all its parts; in a
  SEG without tracking, each 26-connected component of a label's mask) is detected when a predicted
  lesion overlaps it; sensitivity, false-positive lesions per volume, mean Dice of the detected lesions
  (against the predicted lesions that overlap each). True lesions smaller than the node reports
  (``EngineConfig.min_volume_ml``, 0.05 ml: specks of a few voxels that the synthesis's partial volume leaves
  beside a tumour) are neither lesions to find nor findings on their slices (``true_lesions_below_reportable``
  counts them), as detection challenges set a smallest lesion; a predicted lesion on one is no false positive;
  ``lesion_part_sensitivity`` counts each 26-connected part of a true lesion as a lesion of its own (the
  stricter figure where a lesion lies in parts, e.g. a tumour with a satellite);
- reliability calibration: on slices with a predicted finding, the error rate per reliability level; and on
  what the SR reports, per reliability level of the 3D lesions, the fraction that are false positives
  (``lesion_reliability_calibration``; a lesion's level follows from its slices' by the card's lesion rule).

A series that cannot be placed (its series in several stacks, its SEG on a slice the series lacks) is skipped
with a warning naming its series UID; ``all`` lists each under ``skipped_series`` (modality and reason).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from scipy import ndimage

from inference.engine import EngineConfig, interpret_volume
from inference.findings import Lesion, mask_volume_ml
from inference.frames import SlicingError
from inference.ground_truth import read_segmentation
from inference.model.protocol import NO_FINDINGS, Interpretation, normalize_finding
from inference.preprocess import SliceTransform
from inference.reliability import level, semantic_entropy, with_decoder_doubt
from inference.slicing import Volume, load_series
from training.dataset import finding_label
from training.sources import LabeledSeries
from training.text_metrics import bleu1, meteor, rouge_l

logger = logging.getLogger(__name__)

# What a labelled series that cannot be read or placed raises (its SEG is read by pydicom: missing, damaged)
UNPLACEABLE = (SlicingError, InvalidDicomError, OSError)
_UID = re.compile(r"\b\d+(?:\.\d+){3,}\b")


@dataclass
class SliceRecord:
    findings: frozenset[str]  # named by the model's answer on this slice
    reference: frozenset[str]
    output: frozenset[str]  # of the 3D lesions the node reports that cover this slice
    text: str
    reference_text: str
    dice: float | None  # only where the truth has a finding
    reliability: str = ""
    entropy: float | None = None  # the semantic entropy behind ``reliability`` (slices with a finding, sampled)
    stability: float | None = None  # the first mask's stability score (slices with a finding)


@dataclass(frozen=True)
class ReportedLesion:
    """A 3D lesion the node reported, with what its reliability could rest on and whether it was false."""

    reliability: str
    false_positive: bool
    slices: int
    volume_ml: float
    mean_score: float  # the decoder's predicted IoU over its slices
    stability: float  # the lowest stability score of the masks it was joined from
    slice_range: tuple[int, int] = (0, 0)  # first and last slice (volume order)


@dataclass
class SeriesRecord:
    modality: str
    slices: list[SliceRecord] = field(default_factory=list)
    true_lesions: int = 0
    below_reportable: int = 0
    detected: int = 0
    true_parts: int = 0
    detected_parts: int = 0
    false_positives: int = 0
    lesion_dice: list[float] = field(default_factory=list)
    reported: list[ReportedLesion] = field(default_factory=list)


def reference_answer(labels: list[str]) -> str:
    return " ".join(f"It is [SEG]. {label}." for label in labels) if labels else NO_FINDINGS


@dataclass(frozen=True)
class LesionScore:
    true_lesions: int
    detected: int
    false_positives: int
    dice: list[float]  # per detected lesion
    true_parts: int = 0  # 26-connected parts of the true lesions, each counted as a lesion of its own
    detected_parts: int = 0
    false: tuple[bool, ...] = ()  # per predicted lesion, in order: whether it is a false positive


@dataclass(frozen=True)
class GroundTruth:
    """A series' ground truth on its volume's grid, without parts under the node's smallest lesion."""

    labels: dict[str, np.ndarray]  # finding label -> (z, y, x) bool: what each slice shows
    lesions: list[np.ndarray]  # one mask per true lesion
    specks: list[np.ndarray]  # parts too small to report: neither to find nor false positives


def read_truth(item: LabeledSeries, volume: Volume, min_volume_ml: float) -> GroundTruth:
    """The SEG's truth on ``volume``. A lesion is a segment with a Tracking UID (all its parts, however far
    apart: the annotator, or the synthesis, said they are one lesion; segments sharing the UID are one), or
    else each 26-connected component of an untracked label's mask. Components under ``min_volume_ml`` are
    specks (the node never reports those, so they are neither lesions to find nor slices with a finding)."""
    tracked: dict[str, np.ndarray] = {}
    untracked: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(volume.voxels.shape, bool))
    labels: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(volume.voxels.shape, bool))
    for segment in read_segmentation(item.segmentation, volume):
        if not segment.is_finding or not segment.mask.any():  # an organ drawn beside the lesions is no lesion
            continue
        labels[finding_label(segment.label)] |= segment.mask
        if segment.tracking_uid:
            tracked[segment.tracking_uid] = tracked.get(segment.tracking_uid, np.zeros(volume.voxels.shape, bool)) | segment.mask
        else:
            untracked[finding_label(segment.label)] |= segment.mask
    kept: dict[str, np.ndarray] = {}
    specks: list[np.ndarray] = []
    for label, mask in labels.items():
        mask = mask.copy()
        for component in _components(mask):
            if mask_volume_ml(volume, component) < min_volume_ml:
                mask &= ~component
                specks.append(component)
        if mask.any():
            kept[label] = mask
    reportable = np.any(list(kept.values()), axis=0) if kept else np.zeros(volume.voxels.shape, bool)
    lesions = [mask & reportable for mask in tracked.values() if (mask & reportable).any()]
    lesions += [part for mask in untracked.values() for part in _components(mask & reportable)]
    return GroundTruth(kept, lesions, specks)


def pair_lesions(truth: GroundTruth, predicted: list[np.ndarray]) -> tuple[list[list[int]], list[bool]]:
    """Per true lesion, the predicted lesions that overlap it (its detection; Dice is against their union);
    per predicted lesion, whether it is false: it overlaps no true lesion and no speck."""
    overlapping = [[i for i, p in enumerate(predicted) if (p & lesion).any()] for lesion in truth.lesions]
    paired = {i for found in overlapping for i in found}
    false = [i not in paired and not any((p & speck).any() for speck in truth.specks) for i, p in enumerate(predicted)]
    return overlapping, false


def score_lesions(truth: GroundTruth, predicted: list[np.ndarray]) -> LesionScore:
    """A true lesion is detected when a predicted one overlaps it; a predicted lesion that overlaps no true
    lesion and no speck is a false positive (``pair_lesions``). Each part of a true lesion is scored the same
    way on its own (``true_parts``): where lesions lie in parts, the stricter count."""
    overlapping, false = pair_lesions(truth, predicted)
    dice = [dice_score(np.any([predicted[i] for i in found], axis=0), lesion)
            for lesion, found in zip(truth.lesions, overlapping) if found]
    parts = [part for lesion in truth.lesions for part in _components(lesion)]
    found_parts = sum(any((p & part).any() for p in predicted) for part in parts)
    return LesionScore(len(truth.lesions), len(dice), false.count(True), dice, len(parts), found_parts, tuple(false))


def slice_reference(truth: GroundTruth, k: int) -> frozenset[str]:
    return frozenset(normalize_finding(label) for label, mask in truth.labels.items() if mask[k].any())


def slice_output(lesions: list[Lesion], k: int) -> frozenset[str]:
    """The findings the node reports on slice ``k``: those of its 3D lesions that cover it."""
    return frozenset(normalize_finding(lesion.label) for lesion in lesions if lesion.mask[k].any())


def body_part(item: LabeledSeries) -> str:
    """The series' Body Part Examined: the engine checks it against the model's scope, as in the node."""
    return str(dcmread(item.series[0], stop_before_pixels=True).get("BodyPartExamined", ""))


def place(item: LabeledSeries, min_volume_ml: float | None = None) -> tuple[Volume, GroundTruth]:
    """The series' volume and its SEG's truth on it; raises one of UNPLACEABLE where either cannot be had."""
    volume = load_series(item.series)
    return volume, read_truth(item, volume, EngineConfig().min_volume_ml if min_volume_ml is None else min_volume_ml)


def series_uid(item: LabeledSeries) -> str:
    """The Series Instance UID of ``item``: how a log names a hospital's series (its subject is a Patient ID)."""
    try:
        return str(dcmread(item.series[0], stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID)
    except (InvalidDicomError, OSError, AttributeError, IndexError):
        return "(first file unreadable)"


def skipped_series(item: LabeledSeries, exc: Exception, during: str) -> dict[str, str]:
    """Warn that ``item`` is skipped, naming its series UID and why; return the card's record of it: modality
    and reason without UIDs or folders (a card travels with its model; exports are foldered by patient)."""
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    for folder in sorted({str(p.parent) for p in [*item.series, item.segmentation]}, key=len, reverse=True):
        reason = reason.replace(folder, "...")
    logger.warning("%s: series %s (%s) cannot be placed, skipped: %s", during, series_uid(item), item.modality, reason)
    return {"modality": item.modality, "reason": _UID.sub("<UID>", reason)}


def evaluate_series(item: LabeledSeries, model, placed: tuple[Volume, GroundTruth] | None = None) -> SeriesRecord:  # type: ignore[no-untyped-def]
    """``placed``: the item's volume and truth where the caller has them (``place``)."""
    config = EngineConfig()
    volume, truth = placed or place(item, config.min_volume_ml)
    seen: dict[int, tuple[Interpretation, SliceTransform]] = {}
    result = interpret_volume(volume, model, config, body_part(item),
                              observe=lambda k, interpretation, transform: seen.__setitem__(k, (interpretation, transform)))
    record = SeriesRecord(volume.modality, below_reportable=len(truth.specks))
    policy = model.reliability
    for k in range(volume.voxels.shape[0]):
        labels = sorted(label for label, mask in truth.labels.items() if mask[k].any())
        reference = slice_reference(truth, k)
        truth_mask = np.any([mask[k] for mask in truth.labels.values()], axis=0) if truth.labels else np.zeros(volume.voxels.shape[1:], bool)
        if k in seen:
            interpretation, transform = seen[k]
            answer = interpretation.answer
            masks = transform.mask_to_source(answer.masks) if len(answer.masks) else np.zeros((0, *truth_mask.shape), bool)
            predicted_mask = masks.any(axis=0) if len(masks) else np.zeros(truth_mask.shape, bool)
            text, findings = answer.text, frozenset(normalize_finding(f) for f in answer.findings)
            entropy = semantic_entropy(interpretation.samples) if interpretation.samples else None
            stability = float(answer.stability[0]) if len(answer.stability) else None
            reliability = "" if entropy is None else level(with_decoder_doubt(entropy, stability, policy.stability_weight),
                                                           policy).value
        else:
            predicted_mask, text, findings, reliability = np.zeros(truth_mask.shape, bool), NO_FINDINGS, frozenset(), ""
            entropy = stability = None
        dice = dice_score(predicted_mask, truth_mask) if truth_mask.any() else None
        record.slices.append(SliceRecord(findings, reference, slice_output(result.lesions, k), text,
                                         reference_answer(labels), dice, reliability, entropy, stability))
    score = score_lesions(truth, [lesion.mask for lesion in result.lesions])
    record.true_lesions, record.detected, record.false_positives = score.true_lesions, score.detected, score.false_positives
    record.true_parts, record.detected_parts = score.true_parts, score.detected_parts
    record.lesion_dice = score.dice
    record.reported = [reported_lesion(lesion, false, [record.slices[k].stability for k in range(lesion.slice_range[0], lesion.slice_range[1] + 1)])
                       for lesion, false in zip(result.lesions, score.false)]
    return record


def reported_lesion(lesion: Lesion, false_positive: bool, stabilities: list[float | None]) -> ReportedLesion:
    """``stabilities``: of the slices the lesion spans (None where the slice had no mask)."""
    known = [s for s in stabilities if s is not None]
    return ReportedLesion(lesion.reliability.value, false_positive, lesion.slice_count, lesion.volume_ml,
                          lesion.mean_score, min(known) if known else float("nan"), lesion.slice_range)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    return [components == number for number in range(1, count + 1)]


def per_level(rated: list[tuple[str, bool]], count: str, rate: str) -> dict[str, dict[str, float]]:
    """Per reliability level (those that occur): how many were rated so, and the fraction wrong: the test of
    whether a level means what it says."""
    out: dict[str, dict[str, float]] = {}
    for name in ("high", "medium", "low", "unknown"):
        wrong = [w for level_name, w in rated if level_name == name]
        if wrong:
            out[name] = {count: len(wrong), rate: round(sum(wrong) / len(wrong), 4)}
    return out


def summarize(records: list[SeriesRecord]) -> dict:
    """The metrics of the module docstring, for a list of series (one modality or all)."""
    slices = [s for r in records for s in r.slices]
    true_lesions = sum(r.true_lesions for r in records)
    dices = [d for r in records for d in r.lesion_dice]
    slice_dice = [s.dice for s in slices if s.dice is not None]
    calibration = per_level([(s.reliability, s.findings != s.reference) for s in slices if s.findings], "slices", "error_rate")
    lesion_calibration = per_level([(l.reliability, l.false_positive) for r in records for l in r.reported], "lesions",
                                   "false_positive_rate")
    return {
        "volumes": len(records),
        "slices": len(slices),
        "true_lesions": true_lesions,
        "true_lesions_below_reportable": sum(r.below_reportable for r in records),
        "lesion_sensitivity": round(sum(r.detected for r in records) / true_lesions, 4) if true_lesions else None,
        "true_lesion_parts": sum(r.true_parts for r in records),
        "lesion_part_sensitivity": round(sum(r.detected_parts for r in records) / max(sum(r.true_parts for r in records), 1), 4)
        if true_lesions else None,
        "false_positives_per_volume": round(sum(r.false_positives for r in records) / max(len(records), 1), 4),
        "mean_dice_detected_lesions": round(float(np.mean(dices)), 4) if dices else None,
        "slice_dice": round(float(np.mean(slice_dice)), 4) if slice_dice else None,
        "finding_accuracy": round(sum(s.output == s.reference for s in slices) / max(len(slices), 1), 4),
        "answer_finding_accuracy": round(sum(s.findings == s.reference for s in slices) / max(len(slices), 1), 4),
        "bleu1": round(float(np.mean([bleu1(s.text, s.reference_text) for s in slices])), 4) if slices else None,
        "meteor": round(float(np.mean([meteor(s.text, s.reference_text) for s in slices])), 4) if slices else None,
        "rouge_l": round(float(np.mean([rouge_l(s.text, s.reference_text) for s in slices])), 4) if slices else None,
        "reliability_calibration": calibration,
        "lesion_reliability_calibration": lesion_calibration,
    }


def evaluate(items: list[LabeledSeries], model) -> dict:  # type: ignore[no-untyped-def]
    """Metrics per modality and over all held-out series; ``all`` also lists the series skipped."""
    records, skipped = [], []
    for n, item in enumerate(items, start=1):
        try:
            placed = place(item)
        except UNPLACEABLE as exc:  # one incomplete series must not cost a whole run its figures
            skipped.append(skipped_series(item, exc, "evaluation"))
            continue
        records.append(evaluate_series(item, model, placed))
        logger.info("evaluated series %d/%d (%s): %d/%d lesions found, %d false positive(s)", n, len(items), item.modality,
                    records[-1].detected, records[-1].true_lesions, records[-1].false_positives)
        logger.debug("series %d/%d is subject %s", n, len(items), item.subject)  # a Patient ID: never at INFO
    metrics = {modality: summarize([r for r in records if r.modality == modality]) for modality in sorted({r.modality for r in records})}
    metrics["all"] = summarize(records) | {"skipped_series": skipped}
    return metrics


def dice_score(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two masks; 1.0 where both are empty."""
    total = int(a.sum()) + int(b.sum())
    return 2 * int((a & b).sum()) / total if total else 1.0

