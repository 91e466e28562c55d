"""Combining trained runs into one ensemble checkpoint: separately trained heads err on different slices, and
averaging their answers to the [SEG] query costs little, since all share the one frozen encoder that is 98 % of
a slice's cost (``inference.model.builtin``). Averaging the weights instead fails: two runs' heads do not lie in
one basin (docs/model-history.md, run 18)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from inference.model.card import CARD_FILE, WEIGHTS_FILE, EnsembleMember, ModelCard
from inference.model.grounded import GroundedConfig
from inference.model.litemedsam import checked_weights
from storage.files import write_text_durably

# What every member must share with the first: its heads must fit the first's network and answer the same input.
SHARED = ("architecture", "encoder_precision", "input_size", "normalization")
# Architecture fields that say where a finding is called, not what the heads are: the ensemble answers at the
# first run's point until `model point` moves it, so runs trained at other points combine (the shipped model's
# first run was trained at 30 px, its others at 10).
OPERATING_POINT = ("min_mask_pixels", "mask_threshold", "presence_threshold")


class EnsembleError(ValueError):
    """Checkpoints that cannot be combined (another architecture or input, no modality in common)."""


def combine(folders: list[Path], out: Path, version: str, modalities: tuple[str, ...] | None = None) -> ModelCard:
    """One checkpoint in ``out`` holding the first folder's model (its card, its operating point, its heads name
    the findings) and the others' heads as members, each asked about the modalities it shares with the first
    (and, where ``modalities`` names some, only those: other modalities are answered by the first alone).
    The card's held-out figures are cleared (each run's training record kept): the ensemble is scored anew, on
    subjects none of its runs trained on (``benchmarks.fresh_subjects --held-out --unseen-by ... --update-card``)."""
    if len(folders) < 2:
        raise EnsembleError("an ensemble needs at least two checkpoints")
    if (out / CARD_FILE).exists() or any(out.resolve() == folder.resolve() for folder in folders):
        raise EnsembleError(f"{out} holds a checkpoint already: write the ensemble to a new folder")
    cards = [_checked_card(folder) for folder in folders]
    first = cards[0]
    refusal = GroundedConfig(**first.architecture).ensemble_refusal
    if refusal:
        raise EnsembleError(refusal)
    members = []
    for number, (folder, card) in enumerate(zip(folders[1:], cards[1:]), 1):
        differing = [name for name in SHARED if _shared(card, name) != _shared(first, name)]
        if differing:
            raise EnsembleError(f"{folder} differs from {folders[0]} in {', '.join(differing)}: its heads cannot be averaged with it")
        shared = tuple(m for m in first.modalities if m in card.modalities and (modalities is None or m in modalities))
        if not shared:
            raise EnsembleError(f"{folder} answers none of {', '.join(modalities or first.modalities)} that {folders[0]} answers")
        members.append(EnsembleMember(f"member-{number}.safetensors", card.weights_sha256, shared, card.version))
    described = "; ".join(f"{card.version}: {card.training_data}" for card in cards)
    # The held-out figures were the first run's: cleared. Each run's training record is kept, for whoever reproduces it.
    record = [{"version": card.version, "weights_sha256": card.weights_sha256, **card.metrics.get("training", {})}
              for card in cards]
    ensemble = dataclasses.replace(first, version=version, members=tuple(members), metrics={"training": {"ensemble_of": record}},
                                   training_data=f"ensemble of {len(cards)} runs' heads ({described})")
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(folders[0] / WEIGHTS_FILE, out / WEIGHTS_FILE)
    for folder, member in zip(folders[1:], members):
        shutil.copyfile(folder / WEIGHTS_FILE, out / member.weights)
    write_text_durably(out / CARD_FILE, ensemble.to_json())
    return ensemble


def _shared(card: ModelCard, name: str) -> object:
    """A card's ``name`` as members must share it: the architecture without its operating point."""
    if name == "architecture":
        return {k: v for k, v in card.architecture.items() if k not in OPERATING_POINT}
    return getattr(card, name)


def _checked_card(folder: Path) -> ModelCard:
    """The card of a single (not ensemble) checkpoint whose weights match it."""
    try:
        card = ModelCard.from_json((folder / CARD_FILE).read_text())
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise EnsembleError(f"{folder} holds no readable model card ({exc})") from None
    if card.members:
        raise EnsembleError(f"{folder} is an ensemble already: combine the runs it was made of")
    return dataclasses.replace(card, weights_sha256=checked_weights(folder / WEIGHTS_FILE, card.weights_sha256))
