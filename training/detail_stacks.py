"""The detail branch's training inputs, each slice with its neighbours, made when a batch asks for them.

A model with a detail branch sees each slice stacked with ``context`` neighbours each side (2.5D). Stored as
stacks, every slice of a series is held 2 * context + 1 times: 0.8 MB a training slice in float32 at
context 1, 2.8 GB for 120 head-MRI series, and twice that while the series' stacks were joined. Here each
series' slices are held once and a stack is gathered from them by index, with the very values the stored
stacks had.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from inference.model.builtin import mirror_images
from inference.model.detail import context_indices


@dataclass(frozen=True)
class DetailStacks:
    """Indexed like an (n, 2 * context + 1, size, size) float32 array by rows (an int, a slice, or a
    sequence or array of ints): row ``i`` is slice ``members[i, j]`` of series ``series[i]`` for each ``j``."""

    volumes: tuple[np.ndarray, ...]  # per series: (slices, size, size) float32
    series: np.ndarray  # (n,) int: the volume of each row
    members: np.ndarray  # (n, 2 * context + 1) int: the slices of that volume stacked in each row

    @classmethod
    def of_series(cls, volume: np.ndarray, picked: Sequence[int], context: int) -> DetailStacks:
        """The stacks of the slices ``picked`` of one series' ``volume`` (the edge slice repeated past its ends)."""
        members = np.array([context_indices(k, len(volume), context) for k in picked], int).reshape(len(picked), 2 * context + 1)
        return cls((volume,), np.zeros(len(picked), int), members)

    @classmethod
    def joined(cls, parts: Sequence[DetailStacks]) -> DetailStacks:
        """The rows of ``parts`` (one or more) one after another; the volumes are shared, not copied."""
        volumes: list[np.ndarray] = []
        series = []
        for part in parts:
            series.append(part.series + len(volumes))
            volumes.extend(part.volumes)
        return cls(tuple(volumes), np.concatenate(series), np.concatenate([p.members for p in parts]))

    def __len__(self) -> int:
        return len(self.series)

    def __add__(self, other: DetailStacks) -> DetailStacks:
        return DetailStacks.joined([self, other])

    def __getitem__(self, rows: int | slice | Sequence[int] | np.ndarray) -> np.ndarray:
        if isinstance(rows, (int, np.integer)):
            return self.volumes[self.series[rows]][self.members[rows]]
        picked = np.arange(len(self))[rows] if isinstance(rows, slice) else np.asarray(rows, int).reshape(-1)
        out = np.empty((len(picked), self.members.shape[1], *self.volumes[0].shape[1:]), np.float32)
        for n, row in enumerate(picked):
            out[n] = self.volumes[self.series[row]][self.members[row]]
        return out

    def mirrored(self) -> DetailStacks:
        """Every stack mirrored left-right (its slices mirrored, the same rows)."""
        return DetailStacks(tuple(mirror_images(v) for v in self.volumes), self.series, self.members)
