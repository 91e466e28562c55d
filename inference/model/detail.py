"""The detail branch: a small trainable CNN on the model-ready slice (and its neighbours) beside the frozen
encoder, after SAM-HQ's fusion of early, high-resolution features into SAM's mask decoder.

Why: the frozen TinyViT embedding is a 64x64 grid (5.5 mm per cell on a CT, 4 mm on a head MRI); a 7 mm lung
nodule covers one or two cells, and the decoder's 4x upsampling can only guess the boundary between them. The
decoder, fine-tuned on a few hundred masks from frozen features, fitted its training masks (Dice loss 0.1)
and reached a slice Dice near 0.6 on new subjects. The branch gives the decoder features it can train, at
full resolution, and sees the slices above and below (``context`` neighbours each side, 2.5D): a lesion's
ends and a vessel running through the slice look alike on one slice, not on three.

Two outputs, both zero at initialisation so a new model starts as LiteMedSAM's decoder:
- ``dense`` (n, 256, 64, 64): added to SAM's dense prompt embedding (the slot SAM feeds a mask prompt
  through), i.e. to the image embedding the decoder's two-way transformer attends to;
- ``fine`` (n, 32, 256, 256): added to the decoder's upscaled embedding, which the [SEG] query's
  hypernetwork output is multiplied with to give the mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DENSE_CHANNELS, FINE_CHANNELS = 256, 32  # SAM's transformer width and its upscaled embedding's


@dataclass
class DetailFeatures:
    """The branch's outputs for a batch of slices; row i belongs to slice i (index with a list or tensor)."""

    dense: torch.Tensor  # (n, 256, 64, 64)
    fine: torch.Tensor  # (n, 32, 256, 256)

    def __getitem__(self, rows) -> DetailFeatures:  # type: ignore[no-untyped-def]
        return DetailFeatures(self.dense[rows], self.fine[rows])

    def __len__(self) -> int:
        return self.dense.shape[0]


def _conv(inputs: int, outputs: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False),
                         nn.GroupNorm(4 if outputs % 4 == 0 else 1, outputs), nn.ReLU(inplace=True))


class DetailBranch(nn.Module):
    """(n, 2 * context + 1, 256, 256) slices in [0, 1] -> :class:`DetailFeatures`. A small U-Net, ``width``
    channels at 128x128, twice that at 64 and four times at 32, back up to 64 (``dense``) and 128; at full
    resolution one convolution of the input and a 1x1 mix with the upsampled 128 features (``fine``): about a
    GFLOP per slice, so that training on two CPU cores stays within a few seconds a step."""

    def __init__(self, context: int = 0, width: int = 16) -> None:
        super().__init__()
        self.context = context
        half = max(width // 2, 4)
        self.full = _conv(2 * context + 1, half)  # 256
        self.down2 = nn.Sequential(_conv(half, width, 2), _conv(width, width))  # 128
        self.down3 = nn.Sequential(_conv(width, 2 * width, 2), _conv(2 * width, 2 * width))  # 64
        self.down4 = nn.Sequential(_conv(2 * width, 4 * width, 2), _conv(4 * width, 4 * width))  # 32
        self.up3 = _conv(4 * width + 2 * width, 2 * width)  # 64
        self.up2 = _conv(2 * width + width, width)  # 128
        self.to_dense = nn.Conv2d(2 * width, DENSE_CHANNELS, 1)
        self.to_fine = nn.Sequential(nn.Conv2d(width + half, width, 1), nn.ReLU(inplace=True), nn.Conv2d(width, FINE_CHANNELS, 1))
        for head in (self.to_dense, self.to_fine[-1]):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, slices: torch.Tensor) -> DetailFeatures:
        if slices.shape[1] != 2 * self.context + 1:
            raise ValueError(f"the detail branch takes {2 * self.context + 1} slices per input, got {slices.shape[1]}")
        x = slices.float() * 2 - 1
        f1 = self.full(x)
        f2 = self.down2(f1)
        f3 = self.down3(f2)
        f4 = self.down4(f3)
        g3 = self.up3(torch.cat([F.interpolate(f4, scale_factor=2, mode="nearest"), f3], dim=1))
        g2 = self.up2(torch.cat([F.interpolate(g3, scale_factor=2, mode="nearest"), f2], dim=1))
        g1 = torch.cat([F.interpolate(g2, scale_factor=2, mode="bilinear", align_corners=False), f1], dim=1)
        return DetailFeatures(self.to_dense(g3), self.to_fine(g1))


def context_indices(k: int, count: int, context: int) -> list[int]:
    """The slices fed with slice ``k`` of ``count``: ``context`` neighbours each side, the edge slice repeated
    past either end of the series."""
    return [min(max(k + offset, 0), count - 1) for offset in range(-context, context + 1)]
