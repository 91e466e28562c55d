"""Reliability of a finding, after XMedGPT: semantic entropy over sampled answers.

For a slice with a finding, M answers are sampled at a temperature and grouped by their normalised
findings (same labels, same number of [SEG]s = same meaning). The uncertainty has two terms:

- between groups: the entropy of the group frequencies, -sum p_g ln p_g (0 when all answers agree);
- within groups: for each group, how much its masks disagree (1 - mean pairwise IoU of the first mask),
  weighted by the group's frequency.

A model whose mask decoder decides whether a slice has a finding starts every sampled answer from the
decoder's "It is [SEG]", so with one label its samples agree by construction: its doubt is the decoder's, the
greedy mask's stability score (how much of the mask survives a stricter threshold). The card's policy adds
``stability_weight`` times (1 - stability) to the entropy, and cuts the sum into high / medium / low with its
thresholds.

A 3D lesion's level follows from its slices' by the policy's ``lesion_rule``: "worst" (the most doubtful
slice's level) or "median" (the level of its slices' median uncertainty). A true lesion's first and last slices
are thin, in partial volume, and doubtful where its core is not, so under "worst" the stability term marks
many true lesions "low" (10 of 26 on validation head MRIs); a false one is doubtful throughout, which the
median still sees. A lesion shorter than the card's slice rule, kept only because its slices are aligned, is
at best the policy's ``short_lesion_cap``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from enum import Enum
from itertools import combinations

import numpy as np

from inference.model.card import LESION_RULES, ReliabilityPolicy
from inference.model.protocol import Answer, Interpretation


class Reliability(str, Enum):
    HIGH = "high"
    MEDIUM = "medium"
    LOW = "low"
    UNKNOWN = "unknown"  # the model cannot sample (e.g. a UniBiomed checkpoint): judge by mask quality


def semantic_entropy(samples: list[Answer] | tuple[Answer, ...]) -> float:
    """Between-group entropy plus the frequency-weighted within-group mask disagreement (nats)."""
    if not samples:
        return float("nan")
    groups: dict[tuple[str, ...], list[Answer]] = defaultdict(list)
    for answer in samples:
        groups[tuple(answer.findings)].append(answer)
    total = len(samples)
    between = -sum((len(g) / total) * math.log(len(g) / total) for g in groups.values())
    within = sum((len(g) / total) * (1.0 - _mean_pairwise_iou(g)) for g in groups.values())
    return between + within


def uncertainty(interpretation: Interpretation, policy: ReliabilityPolicy) -> float:
    """A slice's uncertainty under the card's policy: NaN where the model could not sample (reliability
    "unknown"). The one definition the engine and the evaluation share."""
    if not interpretation.samples:
        return float("nan")
    stability = interpretation.answer.stability
    return with_decoder_doubt(semantic_entropy(interpretation.samples),
                              float(stability[0]) if len(stability) else None, policy.stability_weight)


def with_decoder_doubt(entropy: float, stability: float | None, weight: float) -> float:
    """``entropy`` plus ``weight`` times the decoder's doubt (1 - the greedy mask's stability score; none where
    the model gives no score): the policy's formula, for a caller that has the entropy already."""
    return entropy if not weight or stability is None else entropy + weight * (1.0 - stability)


def level(entropy: float, policy: ReliabilityPolicy) -> Reliability:
    if math.isnan(entropy):
        return Reliability.UNKNOWN
    if entropy < policy.high_below:
        return Reliability.HIGH
    if entropy > policy.low_above:
        return Reliability.LOW
    return Reliability.MEDIUM


_ORDER = [Reliability.LOW, Reliability.MEDIUM, Reliability.UNKNOWN, Reliability.HIGH]  # worst first


def lesion_uncertainty(uncertainties: Sequence[float], rule: str) -> float:
    """A 3D lesion's uncertainty from its slices' (NaN where none was rated): the largest ("worst") or the
    median ("median"), per LESION_RULES."""
    if rule not in LESION_RULES:
        raise ValueError(f"lesion rule must be one of {', '.join(LESION_RULES)}, not {rule!r}")
    rated = [u for u in uncertainties if not math.isnan(u)]
    if not rated:
        return float("nan")
    return max(rated) if rule == "worst" else float(np.median(rated))


def lesion_level(levels: Sequence[Reliability], uncertainties: Sequence[float],
                 policy: ReliabilityPolicy | None) -> Reliability:
    """A 3D lesion's reliability from its slices' ``levels`` and ``uncertainties`` (same order) under the
    policy's ``lesion_rule``. "worst" (and no policy) takes the worst level, an unrated slice ("unknown") below
    "high"; "median" rates the median of the rated slices' uncertainties ("unknown" where none was rated)."""
    if not levels:
        return Reliability.UNKNOWN
    if policy is None or policy.lesion_rule == "worst":
        return min(levels, key=_ORDER.index)
    return level(lesion_uncertainty(uncertainties, policy.lesion_rule), policy)


def capped(reliability: Reliability, cap: str) -> Reliability:
    """``reliability``, or ``cap`` ("high", "medium", "low") where that is worse; "unknown" stays unknown."""
    if reliability is Reliability.UNKNOWN:
        return reliability
    return min(reliability, Reliability(cap), key=_ORDER.index)


def _mean_pairwise_iou(group: list[Answer]) -> float:
    masks = [a.masks[0] for a in group if len(a.masks)]
    if len(masks) < 2:
        return 1.0
    return float(np.mean([_iou(a, b) for a, b in combinations(masks, 2)]))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)
