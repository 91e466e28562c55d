"""A trained model at another operating point, as a new version: the point (mask threshold, smallest mask,
slice rule; the reliability policy's cuts) turns the decoder's masks into reported lesions and their levels and
does not touch training, so a point chosen on validation subjects (``benchmarks.operating_point``) needs the
same weights and a new card, not a new run."""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

from inference.model.card import CARD_FILE, WEIGHTS_FILE, ModelCard
from inference.model.grounded import GroundedConfig
from inference.model.litemedsam import checked_checkpoint
from storage.files import write_text_durably

KEEP = object()  # a setting left as the source card has it


class RepointError(ValueError):
    """A new point that cannot be written (nothing changed, or out holds a checkpoint; a source whose card or
    weights do not read is a WeightsError, as for every checkpoint)."""


@dataclass(frozen=True)
class PointChange:
    """The settings to change; ``KEEP`` leaves one as it is (None is a value: no aligned-overlap rule, or the
    architecture's mask threshold for every modality)."""

    mask_threshold: object = KEEP  # float | dict[str, float] | None (ModelCard.mask_threshold)
    min_mask_pixels: object = KEEP  # int (GroundedConfig.min_mask_pixels)
    min_lesion_slices: object = KEEP  # int | dict[str, int] (ModelCard.min_lesion_slices)
    aligned_lesion_overlap: object = KEEP  # float | dict[str, float] | None (ModelCard.aligned_lesion_overlap)
    reliability: object = KEEP  # dict: the ReliabilityPolicy fields to change (cuts, stability_weight, lesion_rule, short_lesion_cap)

    def changed(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not KEEP}


def repoint(folder: Path, out: Path, version: str, change: PointChange) -> ModelCard:
    """Write ``folder``'s model (its heads and any ensemble members, each checked against the card) to ``out``
    as ``version`` at the changed point. The held-out figures are cleared, since they were the old point's;
    the training record is kept, with the version the point was changed from."""
    changes = change.changed()
    if not changes:
        raise RepointError("no operating-point setting given: nothing would change")
    if (out / CARD_FILE).exists() or out.resolve() == folder.resolve():
        raise RepointError(f"{out} holds a checkpoint already: write the new version to a new folder")
    source = checked_checkpoint(folder)
    architecture = dict(source.architecture)
    if "min_mask_pixels" in changes:
        architecture["min_mask_pixels"] = changes.pop("min_mask_pixels")
    GroundedConfig(**architecture)  # refuses an impossible min_mask_pixels
    if "reliability" in changes:  # ReliabilityPolicy refuses impossible cuts
        changes["reliability"] = dataclasses.replace(source.reliability, **changes["reliability"])
    training = {**source.metrics.get("training", {}), "operating_point_of": source.version}
    card = dataclasses.replace(source, version=version, architecture=architecture, metrics={"training": training},
                               **changes)  # ModelCard refuses impossible values
    out.mkdir(parents=True, exist_ok=True)
    for name in [WEIGHTS_FILE, *(m.weights for m in source.members)]:
        shutil.copyfile(folder / name, out / name)
    write_text_durably(out / CARD_FILE, card.to_json())
    return card
