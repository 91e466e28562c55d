"""The precision the frozen encoder runs in on this machine.

A model's heads learnt the embeddings of the precision its card names (``ModelCard.encoder_precision``), so
that is the faithful choice. But bf16 is fast only where the hardware computes it: on 2 cores with
AVX512-BF16, 0.7 s a slice against 2.4 s in fp32; on 2 AMD Zen 3 cores (AVX2 only, where bf16 is emulated),
13.9 s against 2.3 s. A node on such a CPU would take over an hour for a 300-slice CT, so "auto" runs a bf16
card in fp32 there.
"""

from __future__ import annotations

import logging
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where a device is asked about, so that config loading stays light
    import torch

logger = logging.getLogger(__name__)


class EncoderPrecision(str, Enum):
    """How the encoder's precision is chosen (``[jobs] encoder_precision``)."""

    AUTO = "auto"  # the card's, unless it is bf16 and this device has no native bf16: then fp32
    CARD = "card"  # the card's, always (what its figures were measured with)
    BF16 = "bf16"
    FP32 = "fp32"


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 in hardware: a CUDA GPU of compute capability 8.0 or later (Ampere;
    older ones emulate it), or a CPU with AVX512-BF16 or AMX (Intel Cooper Lake, Sapphire Rapids and later; AMD
    Zen 4 and later)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type != "cpu":
        return False
    # torch.cpu's capability checks are private; a build without them is treated as having no native bf16.
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def encoder_bf16(card_precision: str, choice: EncoderPrecision | str, device: torch.device) -> bool:
    """Whether the encoder runs in bf16, for a card trained in ``card_precision`` ("bf16" or "fp32")."""
    try:
        choice = EncoderPrecision(choice)
    except ValueError:
        raise ValueError(f"encoder precision must be one of {', '.join(p.value for p in EncoderPrecision)}, "
                         f"not {choice!r}") from None
    if choice is EncoderPrecision.CARD:
        return card_precision == "bf16"
    if choice is EncoderPrecision.AUTO:
        if card_precision == "bf16" and not native_bf16(device):
            logger.info("encoder in fp32 instead of the card's bf16: %s has no native bf16, where bf16 runs about "
                        "6x slower (encoder_precision = \"card\" keeps bf16)", device)
            return False
        return card_precision == "bf16"
    return choice is EncoderPrecision.BF16
