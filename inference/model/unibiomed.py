"""Adapter for real UniBiomed / Sa2VA checkpoints from a local folder, behind the GroundedModel protocol.

The checkpoint's own remote code does the work (``AutoModel.from_pretrained(path, trust_remote_code=True)``
and ``predict_forward(image=..., text=..., tokenizer=...)``); this adapter turns our model-ready slices into
the 8-bit RGB images UniBiomed was trained on, prefixes the question with ``<image>``, strips the chat
template's stop words from the answer and stacks the masks (one per [SEG], at the input image's size).
The real checkpoints hard-code CUDA in their remote code: use a GPU. They cannot sample answers through
``predict_forward`` (greedy only), so their reliability is "unknown" and rests on mask agreement alone;
and they predict no IoU, so mask scores are NaN.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np

from inference.model.card import ReliabilityPolicy
from inference.model.protocol import Answer, Interpretation, ModelScope
from inference.preprocess import Normalization

_SPECIAL = re.compile(r"<\|[^|>]*\|>|</s>|<s>|<\|endoftext\|>")


class UniBiomedModel:
    def __init__(self, path: Path, device: str = "auto", input_size: int = 512,
                 scope: ModelScope = ModelScope(("CT", "MR")), normalization: Normalization = Normalization()) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        cuda = torch.cuda.is_available() if device == "auto" else device.startswith("cuda")
        options = {"trust_remote_code": True, "use_flash_attn": False,
                   "torch_dtype": torch.bfloat16 if cuda else torch.float32}
        if importlib.util.find_spec("accelerate") is not None:
            options["low_cpu_mem_usage"] = True
        self.model = AutoModel.from_pretrained(str(path), **options).eval()
        if cuda:
            self.model = self.model.to("cuda" if device == "auto" else device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=True)
        self.input_size = input_size
        self.scope = scope
        self.normalization = normalization
        self.reliability = ReliabilityPolicy(samples=0)
        self.min_lesion_slices = 1
        self.version = f"{getattr(self.model.config, 'model_type', 'unibiomed')}@{Path(path).name}"

    def interpret(self, images: np.ndarray, question: str, samples: int = 0, temperature: float = 0.7,
                  seed: int = 0) -> list[Interpretation]:
        return [Interpretation(self._answer(image, question)) for image in images]

    def _answer(self, image: np.ndarray, question: str) -> Answer:
        from PIL import Image

        grey = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8)
        rgb = Image.fromarray(np.stack([grey] * 3, axis=-1), mode="RGB")
        text = question if "<image>" in question else f"<image>{question}"
        output = self.model.predict_forward(image=rgb, text=text, tokenizer=self.tokenizer)
        masks = [np.asarray(m, dtype=bool).reshape(-1, *grey.shape)[0] for m in output.get("prediction_masks", [])]
        stacked = np.stack(masks) if masks else np.zeros((0, *grey.shape), dtype=bool)
        return Answer(clean_prediction(output["prediction"]), stacked, np.full(len(masks), np.nan, dtype=np.float32))


def clean_prediction(prediction: str) -> str:
    """The answer without the chat template's special tokens ("It is [SEG]. Liver tumor.<|end|>")."""
    return " ".join(_SPECIAL.sub(" ", prediction).split())
