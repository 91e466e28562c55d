"""Model cards and checkpoints: safetensors of the trainable weights plus a JSON card beside them.

A checkpoint folder holds ``model.safetensors`` and ``model_card.json``. The card says what the model is
(version, architecture sizes), what it may be used on (scope), how its input is normalised, how its
reliability levels are cut, what it was trained on and how it scored. The node refuses a checkpoint whose
weights do not match the SHA-256 the card records.

An ensemble checkpoint holds further sets of trained heads beside ``model.safetensors`` (``EnsembleMember``):
the [SEG] query's mask is averaged over all of them (``BuiltinModel``), as separately trained runs err on
different slices.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from inference.model.markers import CARD_FILE  # noqa: F401 - the card's file name, imported from here by its users
from inference.preprocess import Normalization

ENCODER_PRECISIONS = ("bf16", "fp32")
LESION_RULES = ("worst", "median")  # how a 3D lesion's reliability follows from its slices' (inference.reliability)
LEVELS = ("high", "medium", "low")  # the reliability levels, best first (inference.reliability.Reliability)
WEIGHTS_FILE = "model.safetensors"
_MEMBER_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}\.safetensors")  # a plain name: never a path out of the folder


@dataclass(frozen=True)
class ReliabilityPolicy:
    """XMedGPT-style: M answers sampled at a temperature; their semantic entropy, plus ``stability_weight``
    times the doubt of the decoder (1 - the greedy mask's stability score), cut into three levels. The second
    term is what a model whose mask decoder decides needs: its sampled answers all start from the decoder's
    "It is [SEG]", so with one label they always agree."""

    samples: int = 5
    temperature: float = 0.7
    high_below: float = 0.35  # uncertainty (nats) under which reliability is "high"
    low_above: float = 0.8  # uncertainty above which it is "low"; "medium" between
    stability_weight: float = 0.0  # 0: semantic entropy alone (cards before 1.5.3)
    lesion_rule: str = "worst"  # a 3D lesion's level: its most doubtful slice's ("worst"), or its slices' median
    # uncertainty's ("median"; LESION_RULES)
    short_lesion_cap: str = "high"  # the best level of a lesion shorter than the slice rule, kept only because its
    # slices are aligned (the card's aligned_lesion_overlap): an exception to what the model reports; "high": no cap

    def __post_init__(self) -> None:
        if self.samples < 0 or self.temperature <= 0:
            raise ValueError(f"reliability needs samples >= 0 and a positive temperature, not {self.samples}, {self.temperature}")
        if not 0 <= self.high_below <= self.low_above:
            raise ValueError(f"reliability cuts must satisfy 0 <= high_below <= low_above, not {self.high_below}, {self.low_above}")
        if self.stability_weight < 0:
            raise ValueError(f"stability_weight cannot be negative, not {self.stability_weight}")
        if self.lesion_rule not in LESION_RULES:
            raise ValueError(f"lesion_rule must be one of {', '.join(LESION_RULES)}, not {self.lesion_rule!r}")
        if self.short_lesion_cap not in LEVELS:
            raise ValueError(f"short_lesion_cap must be one of {', '.join(LEVELS)}, not {self.short_lesion_cap!r}")


@dataclass(frozen=True)
class EnsembleMember:
    """Further trained heads in the checkpoint folder (same architecture, same frozen encoder), whose answer to
    the [SEG] query is averaged with the model's own for questions about ``modalities``."""

    weights: str  # a file name in the checkpoint folder
    sha256: str
    modalities: tuple[str, ...]
    version: str = ""  # the run the heads come from

    def __post_init__(self) -> None:
        if not _MEMBER_FILE.fullmatch(self.weights) or self.weights == WEIGHTS_FILE:
            raise ValueError(f"an ensemble member's weights must be a file name such as member-1.safetensors in "
                             f"the checkpoint folder, other than {WEIGHTS_FILE}, not {self.weights!r}")
        if not self.modalities:
            raise ValueError(f"ensemble member {self.weights} answers no modality")
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError(f"ensemble member {self.weights} needs the SHA-256 of its weights")


@dataclass(frozen=True)
class ModelCard:
    name: str
    version: str
    architecture: dict
    modalities: tuple[str, ...]
    body_parts: tuple[str, ...] = ()
    findings: tuple[str, ...] = ()
    input_size: int = 256
    normalization: Normalization = field(default_factory=Normalization)
    reliability: ReliabilityPolicy = field(default_factory=ReliabilityPolicy)
    training_data: str = ""
    metrics: dict = field(default_factory=dict)
    intended_use: str = "Research and engineering only. Not a medical device; not for diagnosis."
    weights_sha256: str = ""
    # A 3D lesion must be seen on this many slices: part of the model's operating point; one number, or one
    # per modality ({"CT": 2, "MR": 3}; a modality not named: 1).
    min_lesion_slices: int | dict[str, int] = 1
    # A lesion on fewer slices, but at least two, is still kept where its consecutive slice masks overlap by at
    # least this fraction of the smaller (inference.findings.aligned): one value, or one per modality ({"CT":
    # 0.9}; a modality not named, or None: no such exception). Part of the operating point too.
    aligned_lesion_overlap: float | dict[str, float] | None = None
    # A pixel is in a mask where the decoder's probability exceeds this: one value, or one per modality ({"MR":
    # 0.4}; a modality not named, or None: the architecture's mask_threshold). Part of the operating point: it
    # sets both a mask's outline and whether a slice draws min_mask_pixels, and the modalities' best differ.
    mask_threshold: float | dict[str, float] | None = None
    # The precision the frozen encoder ran in when the model was trained, so also when it answers: bf16 and
    # fp32 embeddings of one slice differ (by up to 0.44 where their mean magnitude is 0.08), and the heads
    # learnt one of them. bf16 is about 3x faster than fp32 on CPUs with native bf16 (AVX512-BF16: 0.7 against 2.4 s a
    # slice on 2 cores) and 6x slower on those without (AVX2 only, AMD Zen 3: 13.9 against 2.3 s); fp32 runs alike
    # everywhere. Cards from before: bf16.
    encoder_precision: str = "bf16"
    members: tuple[EnsembleMember, ...] = ()  # further heads averaged with the model's own (EnsembleMember)

    def __post_init__(self) -> None:
        if self.encoder_precision not in ENCODER_PRECISIONS:
            raise ValueError(f"encoder_precision must be one of {', '.join(ENCODER_PRECISIONS)}, not {self.encoder_precision!r}")
        if not all(isinstance(v, int) and v >= 1 for v in _settings(self.min_lesion_slices)):
            raise ValueError(f"min_lesion_slices must be at least 1 (per modality or for all), not {self.min_lesion_slices!r}")
        if not all(isinstance(v, (int, float)) and 0 < v <= 1 for v in _settings(self.aligned_lesion_overlap)):
            raise ValueError("aligned_lesion_overlap must be above 0 and at most 1 (per modality or for all), "
                             f"not {self.aligned_lesion_overlap!r}")
        if not all(isinstance(v, (int, float)) and 0 < v < 1 for v in _settings(self.mask_threshold)):
            raise ValueError(f"mask_threshold must lie between 0 and 1 (per modality or for all), not {self.mask_threshold!r}")
        names = [m.weights for m in self.members]
        if len(set(names)) != len(names):
            raise ValueError(f"ensemble members share a weights file: {', '.join(names)}")
        for member in self.members:
            if not set(member.modalities) <= set(self.modalities):
                raise ValueError(f"ensemble member {member.weights} answers {', '.join(member.modalities)}, outside "
                                 f"the model's modalities ({', '.join(self.modalities)})")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelCard:
        raw = json.loads(text)
        raw["modalities"] = tuple(raw["modalities"])
        raw["body_parts"] = tuple(raw.get("body_parts", ()))
        raw["findings"] = tuple(raw.get("findings", ()))
        raw["normalization"] = Normalization(**{k: tuple(v) for k, v in raw.get("normalization", {}).items()})
        raw["reliability"] = ReliabilityPolicy(**raw.get("reliability", {}))
        raw["members"] = tuple(EnsembleMember(**{**m, "modalities": tuple(m["modalities"])}) for m in raw.get("members", ()))
        return cls(**raw)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _settings(value: object) -> list:
    """The values of an operating-point setting given for all modalities, per modality (a dict), or not at all."""
    if value is None:
        return []
    return list(value.values()) if isinstance(value, dict) else [value]
