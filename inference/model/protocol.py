"""The GroundedModel protocol and the UniBiomed question/answer format.

A model takes a batch of model-ready slices and one question and answers each slice with text and one mask
per ``[SEG]`` token, UniBiomed style: "It is [SEG]. Liver tumor." or "No findings.".
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from inference.model.card import ReliabilityPolicy
from inference.preprocess import Normalization

SEG_TOKEN = "[SEG]"
NO_FINDINGS = "No findings."
MODALITY_NAMES = {"CT": "CT", "MR": "MRI"}


def recognition_question(modality: str) -> str:
    """Grounded recognition, as UniBiomed asks it."""
    return (f"Can you identify any abnormality within this {MODALITY_NAMES.get(modality, modality)} image? "
            "Please respond with segmentation masks.")


def segmentation_question(target: str, modality: str) -> str:
    """Targeted segmentation: the answer is "It is [SEG]."."""
    return f"Please segment {target} in the {MODALITY_NAMES.get(modality, modality)} image."


def question_modality(question: str) -> str | None:
    """The modality a question built by ``recognition_question`` or ``segmentation_question`` asks about (None
    where it names none): what picks an ensemble's members, since a model is asked only the question."""
    for modality, name in MODALITY_NAMES.items():
        if f" {name} image" in question:
            return modality
    return None


@dataclass(frozen=True)
class Answer:
    """One slice's answer: ``masks`` (n_seg, size, size) bool on the model grid, ``scores`` the decoder's
    predicted IoU per mask, ``stability`` SAM's stability score per mask (empty where the model gives none)."""

    text: str
    masks: np.ndarray
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))
    stability: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float32))

    @property
    def findings(self) -> list[str]:
        """The finding label that follows each [SEG], normalised ("Liver tumor")."""
        return parse_findings(self.text)


@dataclass(frozen=True)
class Interpretation:
    """The greedy answer for one slice and, for slices with a finding, answers sampled at a temperature
    (empty where the model cannot sample; reliability then rests on the mask quality alone)."""

    answer: Answer
    samples: tuple[Answer, ...] = ()


@dataclass(frozen=True)
class ModelScope:
    """What a model was trained for; anything else is "not assessed", never "no findings"."""

    modalities: tuple[str, ...]
    body_parts: tuple[str, ...] = ()  # empty: any body part of those modalities

    def covers(self, modality: str, body_part: str = "") -> bool:
        if modality not in self.modalities:
            return False
        return not self.body_parts or not body_part or body_part.upper() in self.body_parts


class GroundedModel(Protocol):
    """What the engine needs of a model (the built-in one, a UniBiomed checkpoint, a test double)."""

    input_size: int
    scope: ModelScope
    version: str
    normalization: Normalization
    reliability: ReliabilityPolicy
    min_lesion_slices: int | Mapping[str, int]  # 3D lesions seen on fewer slices are dropped (1: none); per modality

    def interpret(self, images: np.ndarray, question: str, samples: int = 0, temperature: float = 0.7,
                  seed: int = 0) -> list[Interpretation]:
        """``images`` (n, size, size) float32 in [0, 1]; one Interpretation per slice."""
        ...


_FINDING = re.compile(r"\[SEG\]\s*\.?\s*([^.\[\]]*)")


def min_lesion_slices(model: GroundedModel, modality: str) -> int:
    """The model's operating point for a series of ``modality`` (one value for all, or one per modality)."""
    value = model.min_lesion_slices
    return value if isinstance(value, int) else int(value.get(modality, 1))


def aligned_lesion_overlap(model: GroundedModel, modality: str) -> float | None:
    """The overlap that keeps a short lesion whose slices are aligned (ModelCard.aligned_lesion_overlap); None
    where the model has none, for this modality or at all (adapters without a card)."""
    value = getattr(model, "aligned_lesion_overlap", None)
    return value.get(modality) if isinstance(value, Mapping) else value


def parse_findings(text: str) -> list[str]:
    """One label per [SEG] in the answer; "" where the answer names none (targeted segmentation)."""
    return [normalize_finding(m.group(1)) for m in _FINDING.finditer(text)]


def normalize_finding(label: str) -> str:
    """Case, spacing and punctuation folded, so that sampled answers group by meaning."""
    words = re.sub(r"[^a-z0-9 ]+", " ", label.lower()).split()
    return " ".join(words).capitalize()
