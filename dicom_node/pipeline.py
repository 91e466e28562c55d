"""One series to its results: load and slice, interpret, aggregate, build the SEG and the SR.

:func:`interpret_series` reads the files it is given and touches nothing else, so the node's job worker
and ``dicom-node analyze`` (a folder, no network) run exactly the same steps. Saving, indexing and queueing
the deliveries are the caller's.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

from dicom_node.outputs.seg import AlgorithmInfo, build_seg
from dicom_node.outputs.sr import build_sr
from inference.engine import EngineConfig, SeriesResult, interpret_volume
from inference.findings import Lesion
from inference.model.loading import model_name
from inference.model.protocol import GroundedModel
from inference.slicing import Volume, load_stacks

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Question:
    """What a route asks: empty ``text`` means UniBiomed's recognition question for the modality."""

    text: str = ""
    target: str = ""


@dataclass
class SeriesOutputs:
    volume: Volume
    result: SeriesResult
    seg: Dataset | None
    sr: Dataset
    run: int
    stacks_not_assessed: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    instance_numbers: dict[str, int] = field(default_factory=dict)  # SOP Instance UID -> Instance Number

    def summary(self) -> dict:
        """The findings in short, as JSON-ready data (status, `analyze`, the job row)."""
        return {
            "series_instance_uid": self.volume.series_instance_uid,
            "modality": self.volume.modality,
            "run": self.run,
            "assessment": self.result.assessment.value,
            "reason": self.result.reason,
            "model": self.result.model_version,
            "question": self.result.question,
            "slices_interpreted": self.result.slices_interpreted,
            "slices_skipped": self.result.slices_skipped,
            "stacks_not_assessed": self.stacks_not_assessed,
            "series_notes": self.volume.issues.describe(),
            "lesions": [
                {
                    "label": lesion.label,
                    "volume_ml": round(lesion.volume_ml, 3),
                    "largest_axial_diameter_mm": round(lesion.largest_axial_diameter_mm, 1),
                    "instance_numbers": self._instance_range(lesion),
                    "reliability": lesion.reliability.value,
                    "mask_score": round(lesion.mean_score, 3),
                }
                for lesion in self.result.lesions
            ],
            "seg_sop_instance_uid": str(self.seg.SOPInstanceUID) if self.seg is not None else "",
            "sr_sop_instance_uid": str(self.sr.SOPInstanceUID),
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }


    def _instance_range(self, lesion: Lesion) -> list[int]:
        """First and last Instance Number the lesion is on: the image numbers a viewer shows."""
        numbers = [self.instance_numbers[s.sop_instance_uid] for s in lesion.sources if s.sop_instance_uid in self.instance_numbers]
        return [min(numbers), max(numbers)] if numbers else []


def interpret_series(paths: list[Path], model: Callable[[], GroundedModel], question: Question = Question(),
                     run: int = 1) -> SeriesOutputs:
    """Interpret the series in ``paths`` (one series; several stacks: the largest is interpreted).

    ``model`` returns the model when called: it is loaded only for a series that can be sliced.

    Raises the slicing pipeline's SlicingError when the series cannot be made into a volume (with the reason).
    """
    started = time.perf_counter()
    stacks = load_stacks(paths)
    volume = max(stacks, key=lambda v: len(v.sources))
    if len(stacks) > 1:
        logger.warning("series %s has %d stacks; the largest (%d slices) is interpreted", volume.series_instance_uid,
                       len(stacks), len(volume.sources))
    wanted = {ref.sop_instance_uid for ref in volume.sources}
    headers = [dcmread(p, stop_before_pixels=True) for p in paths]
    sources = [ds for ds in headers if str(ds.SOPInstanceUID) in wanted]
    body_part = str(sources[0].get("BodyPartExamined", "")) if sources else ""
    interpreter = model()
    loaded = time.perf_counter()
    config = EngineConfig(question=question.text or None, target=question.target)
    result = interpret_volume(volume, interpreter, config, body_part)
    interpreted = time.perf_counter()
    algorithm = AlgorithmInfo(model_name(interpreter), interpreter.version)
    seg = build_seg(sources, volume, result.lesions, algorithm, run) if result.has_findings else None
    sr = build_sr(sources, volume, result, seg, algorithm, run)
    built = time.perf_counter()
    seconds = {"load": loaded - started, "model": interpreted - loaded, "outputs": built - interpreted}
    numbers = {str(ds.SOPInstanceUID): int(ds.InstanceNumber) for ds in sources if ds.get("InstanceNumber") is not None}
    return SeriesOutputs(volume, result, seg, sr, run, len(stacks) - 1, seconds, numbers)
