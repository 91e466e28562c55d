"""Frozen-encoder outputs cached on disk: the encoder is 98 % of the cost of a slice and never changes
during training, so each model-ready slice is encoded once, for every epoch and every later run."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from inference.model.builtin import BuiltinModel, mirror_images
from inference.model.litemedsam import LITEMEDSAM_SHA256
from storage.files import replace_durably


EMBEDDING_SHAPE = (256, 64, 64)  # LiteMedSAM's image embedding of one slice
COMPILE_FROM = 16  # missing slices in one call from which the encoder is compiled (a series' worth: bulk encoding)


class EmbeddingCache:
    """(256, 64, 64) bf16 embeddings keyed by the SHA-1 of the model-ready slice and the encoder's identity."""

    def __init__(self, folder: Path, model: BuiltinModel, batch_size: int = 4) -> None:
        tag = f"litemedsam-{LITEMEDSAM_SHA256[:12]}-{'bf16' if model.bf16 else 'fp32'}-{model.input_size}"
        self.folder = folder / tag
        self.folder.mkdir(parents=True, exist_ok=True)
        self.model = model
        self.batch_size = batch_size
        self.hits = self.misses = 0

    def _path(self, image: np.ndarray) -> Path:
        key = hashlib.sha1(np.ascontiguousarray(image, dtype=np.float32).tobytes()).hexdigest()
        return self.folder / key[:2] / f"{key}.pt"

    def get(self, images: np.ndarray) -> torch.Tensor:
        """(n, size, size) model-ready slices -> (n, 256, 64, 64) bf16 embeddings, encoding only the missing."""
        return self.stored(images)[:]

    def stored(self, images: np.ndarray) -> StoredEmbeddings:
        """The embeddings of (n, size, size) model-ready slices, encoded where missing, left on disk."""
        paths = [self._path(image) for image in images]
        missing = [i for i, p in enumerate(paths) if not p.is_file()]
        if len(missing) >= COMPILE_FROM and not self.model.bf16:
            self.model.compile_encoder()  # a minute of compiling pays back from about a hundred slices
        self.hits += len(paths) - len(missing)
        self.misses += len(missing)
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            with torch.inference_mode():
                encoded = self.model.encode(images[chunk]).to(torch.bfloat16).cpu()
            for i, embedding in zip(chunk, encoded):
                _save_whole(embedding, paths[i])
        return StoredEmbeddings(paths)


class CacheWriteError(OSError):
    """An embedding that could not be written (a full disk, most often): the run stops with the folder named,
    and a rerun with --resume encodes from there."""


def _save_whole(embedding: torch.Tensor, path: Path) -> None:
    """Write through a temporary file, so that a reader never meets a partial embedding; a write that fails (a
    disk filled by a long encoding run) leaves no partial file either."""
    temporary = path.with_suffix(".tmp")
    try:
        path.parent.mkdir(exist_ok=True)
        torch.save(embedding.clone(), temporary)
        replace_durably(temporary, path)
    except (OSError, RuntimeError) as exc:  # torch reports a short write as RuntimeError
        temporary.unlink(missing_ok=True)
        raise CacheWriteError(f"cannot write the encoder cache in {path.parent.parent} ({exc}); "
                              "is the disk full? Free space and run again with --resume") from None


class StoredEmbeddings:
    """A training set's embeddings, read from the cache a batch at a time. At 2 MB a slice (bf16), held in
    memory they took 7 GB for 120 head MRIs and twice that while joined: a 160-subject run was killed for
    memory on 24 GiB. Indexed like a tensor's first dimension (an int, a slice, a sequence of ints)."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __add__(self, other: StoredEmbeddings) -> StoredEmbeddings:
        return StoredEmbeddings(self.paths + other.paths)

    def __getitem__(self, index: int | slice | Sequence[int] | np.ndarray) -> torch.Tensor:
        if isinstance(index, (int, np.integer)):
            return torch.load(self.paths[index], weights_only=True)
        rows = range(len(self.paths))[index] if isinstance(index, slice) else np.asarray(index, int).reshape(-1).tolist()
        if not rows:
            return torch.zeros((0, *EMBEDDING_SHAPE), dtype=torch.bfloat16)
        return torch.stack([torch.load(self.paths[i], weights_only=True) for i in rows])


class CachedEncoderModel:
    """A BuiltinModel whose encoder outputs come from the cache: evaluation runs the real engine on it."""

    def __init__(self, model: BuiltinModel, cache: EmbeddingCache) -> None:
        self._model, self._cache = model, cache

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        return getattr(self._model, name)

    def interpret(self, images: np.ndarray, question: str, samples: int = 0, temperature: float = 0.7, seed: int = 0,  # type: ignore[no-untyped-def]
                  context: np.ndarray | None = None):
        slices = self._model.detail_input(images, context)
        embeddings = self._cache.get(images).float().to(self._model.device)
        mirrored = None
        if self._model.network.config.mirror:
            mirrored = self._cache.get(mirror_images(images)).float().to(self._model.device)
        return self._model.interpret_embeddings(embeddings, question, samples, temperature, seed, mirrored, slices)
