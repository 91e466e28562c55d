"""Hard negatives: the clear training slices on which the trained model still draws a lesion.

On held-out CT most false-positive lesions are of two kinds (docs/model-history.md, "what was tried"): the rounded end of an
organ on the first or last slices of a series (the liver's tip looks like a hyperdense nodule against fat),
and bowel, whose density is a hypodense liver tumour's. Such slices are a few percent of the clear slices, so
a batch drawn uniformly shows them rarely. After the main schedule the trainer scores every clear slice once
(the "It is [SEG]" query's mask, as the node decides) and trains on for a few steps with part of each batch's
clear slices drawn from those that still give a mask of ``min_pixels`` or more: bootstrapping, as detectors
have mined hard negatives since Sung and Poggio.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from inference.model.grounded import GroundedSegmenter
from inference.model.protocol import recognition_question
from training.cache import StoredEmbeddings
from training.detail_stacks import DetailStacks


@torch.inference_mode()
def query_mask_pixels(network: GroundedSegmenter, embeddings: StoredEmbeddings | torch.Tensor,
                      detail_inputs: DetailStacks | np.ndarray | None, rows: np.ndarray, modality: str, batch_size: int = 16,
                      autocast: bool = False) -> np.ndarray:
    """Pixels of the [SEG] query's mask above ``mask_threshold`` per slice: (len(rows),) int. ``rows``: one
    modality's slices among ``embeddings`` (and ``detail_inputs``, the detail-branch stacks of models with
    one), read a batch at a time."""
    device = next(network.mask_decoder.parameters()).device
    question = recognition_question(modality)
    rows = np.asarray(rows, int)
    counts = []
    for start in range(0, len(rows), batch_size):
        chunk_rows = rows[start:start + batch_size]
        chunk = embeddings[chunk_rows].float().to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            detail = None
            if detail_inputs is not None:
                detail = network.detail_features(torch.from_numpy(detail_inputs[chunk_rows]).float().to(device))
            logits, _ = network.decode_masks(chunk, network.query_states(chunk, question), detail)
        counts.append(network.mask_pixels(logits).cpu().numpy())
    return np.concatenate(counts) if counts else np.zeros(0, int)


def hard_negatives(network: GroundedSegmenter, embeddings: StoredEmbeddings | torch.Tensor, detail_inputs: DetailStacks | np.ndarray | None,
                   clear: Mapping[str, np.ndarray], min_pixels: int, autocast: bool = False) -> dict[str, np.ndarray]:
    """Per modality, the indices among its ``clear`` slices (rows of ``embeddings``) whose query mask has at
    least ``min_pixels`` pixels: what the model would report as a finding there."""
    hard = {}
    was_training = network.training
    network.eval()
    try:
        for modality, rows in clear.items():
            pixels = query_mask_pixels(network, embeddings, detail_inputs, rows, modality, autocast=autocast)
            hard[modality] = np.asarray(rows, int)[pixels >= min_pixels]
    finally:
        network.train(was_training)
    return hard
