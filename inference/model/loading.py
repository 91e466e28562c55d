"""Loading whatever model a route names: a built-in checkpoint or a UniBiomed/Sa2VA folder."""

from __future__ import annotations

from pathlib import Path

from inference.model.card import CARD_FILE
from inference.model.litemedsam import WeightsError
from inference.model.protocol import GroundedModel


def load_model(path: Path, device: str = "auto") -> GroundedModel:
    """The model in ``path``: ``model_card.json`` marks a built-in checkpoint, ``config.json`` a UniBiomed one."""
    if (path / CARD_FILE).is_file():
        from inference.model.builtin import BuiltinModel, pick_device

        return BuiltinModel.load(path, device=pick_device(device))
    if (path / "config.json").is_file():
        from inference.model.unibiomed import UniBiomedModel

        return UniBiomedModel(path, device)
    raise WeightsError(f"{path} holds no model ({CARD_FILE} for a built-in checkpoint, config.json for UniBiomed)")


def model_name(model: GroundedModel) -> str:
    """The name the DICOM outputs give the algorithm."""
    card = getattr(model, "card", None)
    return card.name if card is not None else type(model).__name__.removesuffix("Model") or "model"
