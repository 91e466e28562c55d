"""Loading whatever model a route names: a built-in checkpoint or a UniBiomed/Sa2VA folder."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from inference.model.markers import CARD_FILE, UNIBIOMED_CONFIG
from inference.model.litemedsam import WeightsError
from inference.model.precision import EncoderPrecision
from inference.model.protocol import GroundedModel

logger = logging.getLogger(__name__)


def load_model(path: Path, device: str = "auto", precision: EncoderPrecision | str = EncoderPrecision.AUTO,
               compile_encoder: bool = False) -> GroundedModel:
    """The model in ``path``: ``model_card.json`` marks a built-in checkpoint, ``config.json`` a UniBiomed one.
    ``precision``: a built-in model's encoder precision (``inference.model.precision``); ``compile_encoder``:
    compile a built-in model's fp32 CPU encoder now (``BuiltinModel.prepare_compiled_encoder``)."""
    if (path / CARD_FILE).is_file():
        from inference.model.builtin import BuiltinModel, pick_device

        model = BuiltinModel.load(path, device=pick_device(device), precision=precision)
        if compile_encoder:
            model.prepare_compiled_encoder()
        return model
    if (path / UNIBIOMED_CONFIG).is_file():
        from inference.model.unibiomed import UniBiomedModel

        return UniBiomedModel(path, device)
    raise WeightsError(f"{path} holds no model ({CARD_FILE} for a built-in checkpoint, {UNIBIOMED_CONFIG} for UniBiomed)")


class ModelCache:
    """One loaded model per checkpoint folder, shared by the callers (the node's job threads, `analyze`)."""

    def __init__(self, device: str = "auto", precision: EncoderPrecision | str = EncoderPrecision.AUTO,
                 compile_encoder: bool = False) -> None:
        self._device = device
        self._precision = precision
        self._compile = compile_encoder
        self._models: dict[Path, GroundedModel] = {}
        self._lock = threading.Lock()  # guards the two dicts
        self._loading: dict[Path, threading.Lock] = {}  # one per folder: a load (a compile: a minute) blocks only its own callers

    def get(self, path: Path) -> GroundedModel:
        with self._lock:
            if path in self._models:
                return self._models[path]
            loading = self._loading.setdefault(path, threading.Lock())
        with loading:
            with self._lock:
                if path in self._models:  # loaded by the caller this one waited for
                    return self._models[path]
            logger.info("loading model from %s", path)
            started = time.perf_counter()
            model = load_model(path, self._device, self._precision, self._compile)
            logger.info("model %s loaded in %.1f s", model.version, time.perf_counter() - started)
            with self._lock:
                self._models[path] = model
            return model


def model_name(model: GroundedModel) -> str:
    """The name the DICOM outputs give the algorithm."""
    card = getattr(model, "card", None)
    return card.name if card is not None else type(model).__name__.removesuffix("Model") or "model"
