"""Reliability of a finding, after XMedGPT: semantic entropy over sampled answers.

For a slice with a finding, M answers are sampled at a temperature and grouped by their normalised
findings (same labels, same number of [SEG]s = same meaning). The uncertainty has two terms:

- between groups: the entropy of the group frequencies, -sum p_g ln p_g (0 when all answers agree);
- within groups: for each group, how much its masks disagree (1 - mean pairwise IoU of the first mask),
  weighted by the group's frequency.

Their sum is cut into high / medium / low with thresholds stored in the model card.
"""

from __future__ import annotations

import math
from collections import defaultdict
from enum import Enum
from itertools import combinations

import numpy as np

from inference.model.card import ReliabilityPolicy
from inference.model.protocol import Answer


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


def level(entropy: float, policy: ReliabilityPolicy) -> Reliability:
    if math.isnan(entropy):
        return Reliability.UNKNOWN
    if entropy < policy.high_below:
        return Reliability.HIGH
    if entropy > policy.low_above:
        return Reliability.LOW
    return Reliability.MEDIUM


def _mean_pairwise_iou(group: list[Answer]) -> float:
    masks = [a.masks[0] for a in group if len(a.masks)]
    if len(masks) < 2:
        return 1.0
    return float(np.mean([_iou(a, b) for a, b in combinations(masks, 2)]))


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)
