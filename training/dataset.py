"""Training samples from DICOM series with ground-truth DICOM-SEG, through the inference slicing pipeline.

Training never reads pixels its own way: a series goes through ``inference.slicing.load_series`` and
``inference.preprocess.prepare`` exactly as at inference, and the SEG's masks are placed on that volume by
``inference.ground_truth`` and carried onto the model grid by the same transform. What the model learns is
what it later sees.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from inference.ground_truth import read_segmentation
from inference.model.protocol import NO_FINDINGS
from inference.preprocess import Normalization, prepare
from inference.slicing import load_series



@dataclass(frozen=True)
class SliceSample:
    """One model-grid slice and its target: ``masks`` is (n_findings, size, size) bool, one per [SEG]."""

    image: np.ndarray  # (size, size) float32 in [0, 1]
    masks: np.ndarray
    labels: tuple[str, ...]  # finding label per mask, e.g. ("Liver tumor",)
    series_instance_uid: str
    slice_index: int
    modality: str = ""

    @property
    def answer(self) -> str:
        """The UniBiomed-style target answer: "It is [SEG]. Liver tumor." or "No findings."."""
        if not self.labels:
            return NO_FINDINGS
        return " ".join(f"It is [SEG]. {label}." for label in self.labels)


def finding_label(segment_label: str) -> str:
    """"liver  tumor 2" -> "Liver tumor": the finding a segment shows, as the model says it (the node numbers
    the segments of its own SEGs; annotation tools often do too). Case and spacing are folded, first letter
    upper as in the node's own labels: spelled apart, one finding would train as two, half a lesion each."""
    words = re.sub(r"[\s_-]*\d+$", "", segment_label.strip()).split() or segment_label.split()
    return " ".join(words).capitalize()


def series_samples(series: list[Path], segmentation: Path, size: int = 256,
                   normalization: Normalization = Normalization()) -> list[SliceSample]:
    """Every slice of the series with the SEG's findings on it (slices without any: "No findings."; an organ
    segmented beside them is not a finding, see :attr:`inference.ground_truth.Segment.is_finding`)."""
    volume = load_series(series)
    model_input = prepare(volume, size=size, normalization=normalization)
    by_label: dict[str, np.ndarray] = {}  # one [SEG] per finding: a SEG with a segment per lesion is merged by label
    for segment in (s for s in read_segmentation(segmentation, volume) if s.is_finding):
        label = finding_label(segment.label)
        by_label[label] = by_label[label] | segment.mask if label in by_label else segment.mask
    samples = []
    for k in range(len(volume.sources)):
        present = [label for label, mask in by_label.items() if mask[k].any()]
        masks = model_input.transform.mask_to_model(np.stack([by_label[l][k] for l in present])) if present else np.zeros((0, size, size), bool)
        samples.append(SliceSample(model_input.images[k], masks, tuple(present), volume.series_instance_uid, k, volume.modality))
    return samples
