"""argparse types of the training and model commands: each turns an option's text into the value the trainer or
a model card holds, or a usage error that names the option's form (never a value that fails later, mid-run)."""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar


def count_argument(least: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least ``least`` (a step count), else a usage error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least}, not {value}")
        return value
    return parse


VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def version_argument(text: str) -> str:
    """An argparse type: a version name, which becomes a folder under the store's models/ and a name in
    `model list`; a "/" or ".." would put the checkpoint elsewhere, and "active" or "shipped" mean other models."""
    if not VERSION_NAME.fullmatch(text) or text in ("active", "shipped"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a version name (up to 64 letters, digits, '.', '_', '-', "
                                         "starting with a letter or digit; not \"active\" or \"shipped\")")
    return text


Number = TypeVar("Number", int, float)


def lesion_slices_argument(text: str) -> int | dict[str, int]:
    """"2" -> 2; "CT=2,MR=3" -> {"CT": 2, "MR": 3} (ModelCard.min_lesion_slices)."""
    return _per_modality(text, int, lambda v: v >= 1, "N", "CT=2,MR=3", "every slice count must be at least 1")


def aligned_overlap_argument(text: str) -> float | dict[str, float]:
    """"0.9" -> 0.9; "CT=0.9" -> {"CT": 0.9} (ModelCard.aligned_lesion_overlap)."""
    return _per_modality(text, float, lambda v: 0 < v <= 1, "F", "CT=0.9", "every overlap must be above 0 and at most 1")


def _per_modality(text: str, convert: Callable[[str], Number], valid: Callable[[Number], bool], name: str,
                  example: str, rule: str) -> Number | dict[str, Number]:
    """One value for all modalities, or MODALITY=value pairs (modalities upper-cased), each checked by ``valid``."""
    try:
        if "=" not in text:
            value: Number | dict[str, Number] = convert(text)
        else:
            value = {modality.strip().upper(): convert(number) for modality, number in (part.split("=", 1) for part in text.split(","))}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {name} or MODALITY={name},... (e.g. {example}), not {text!r}") from None
    if not all(valid(v) for v in (value.values() if isinstance(value, dict) else [value])):
        raise argparse.ArgumentTypeError(f"{rule} ({name} or MODALITY={name},..., e.g. {example}): {text!r}")
    return value


def mask_threshold_argument(text: str) -> float | dict[str, float]:
    """"0.4" -> 0.4; "MR=0.4" -> {"MR": 0.4} (ModelCard.mask_threshold)."""
    return _per_modality(text, float, lambda v: 0 < v < 1, "P", "MR=0.4", "every threshold must lie between 0 and 1")


@dataclass(frozen=True)
class Given:
    """An option's value where None is a value of its own ("none"), told apart from the option not given."""

    value: object


def reliability_cuts_argument(text: str) -> tuple[float, float]:
    """"0.2,0.45" -> (0.2, 0.45): the uncertainty under which reliability is high, and over which it is low."""
    try:
        high, low = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HIGH,LOW uncertainty cuts such as 0.2,0.45, not {text!r}") from None
    if not 0 <= high <= low:
        raise argparse.ArgumentTypeError(f"the cuts must satisfy 0 <= HIGH <= LOW, not {text!r}")
    return high, low


def optional(parse: Callable[[str], object]) -> Callable[[str], Given]:
    """An argparse type: "none" (no such rule) or what ``parse`` reads, wrapped in Given."""
    def parse_or_none(text: str) -> Given:
        return Given(None if text.strip().lower() == "none" else parse(text))
    return parse_or_none


def presence_argument(text: str) -> float:
    """"0.3" -> 0.3, checked by GroundedConfig itself (a presence probability, at least 0 and below 1)."""
    from inference.model.grounded import GroundedConfig

    try:
        return GroundedConfig(presence_threshold=float(text)).presence_threshold
    except ValueError:
        raise argparse.ArgumentTypeError(f"presence_threshold must be at least 0 and below 1, not {text!r}") from None
