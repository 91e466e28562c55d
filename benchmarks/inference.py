"""Inference benchmark: slices per second and peak memory of the built-in model, split by stage.

Runs the engine on a synthetic CT volume (body in every slice but the first and last few, which the engine
skips) with the model's default architecture. Without a trained checkpoint the heads are freshly initialised
and the language model is capped at ``--answer-tokens`` new tokens, the length of a typical answer
("It is [SEG]. Liver tumor." is 7 tokens and EOS), so that the language model's share is realistic.

    python -m benchmarks.inference [--slices 24] [--threads 2] [--batch 4] [--checkpoint DIR] [--precision card|auto|bf16|fp32]
                                   [--compile]

``--compile``: as a node with ``[jobs] compile_encoder = true`` (an fp32 encoder on the CPU compiled while
the model loads); the compile's seconds are reported beside the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch

from inference.engine import EngineConfig, interpret_volume
from inference.model.builtin import BuiltinModel, pick_device
from inference.model.card import ModelCard
from inference.model.grounded import GroundedConfig
from inference.model.precision import EncoderPrecision
from inference.slicing import SliceRef, Volume


def synthetic_ct(slices: int, size: int = 512, empty: int = 2) -> Volume:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size]
    body = ((yy - size / 2) / (size * 0.35)) ** 2 + ((xx - size / 2) / (size * 0.45)) ** 2 <= 1
    voxels = np.where(body, 40.0, -1000.0).astype(np.float32)[None].repeat(slices, 0)
    voxels += rng.normal(0, 10, voxels.shape).astype(np.float32)
    voxels[:empty] = voxels[-empty:] = -1000.0
    return Volume(voxels, np.zeros(3), (0.8, 0.8, 1.0), np.eye(3), np.arange(slices, dtype=float), "1.2.3", "CT",
                  "1.2.3.4", [SliceRef(f"1.2.3.4.{k}") for k in range(slices)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--answer-tokens", type=int, default=8)
    parser.add_argument("--checkpoint", type=Path, help="a checkpoint folder; default: default architecture, fresh heads")
    parser.add_argument("--precision", choices=[p.value for p in EncoderPrecision], default="card",
                        help="the encoder's precision (default: the checkpoint card's; fp32 for fresh heads; "
                             "auto: as the node chooses on this machine)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true",
                        help="compile an fp32 CPU encoder first, as [jobs] compile_encoder = true does")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    if args.checkpoint:
        model = BuiltinModel.load(args.checkpoint, device=device, precision=args.precision)
    else:
        architecture = dataclasses.replace(GroundedConfig(), max_new_tokens=args.answer_tokens).to_dict()
        card = ModelCard(name="benchmark", version="0", architecture=architecture, modalities=("CT",),
                         encoder_precision="bf16" if args.precision == "bf16" else "fp32")
        model = BuiltinModel.new(card, device=device)
    compiled, compile_seconds = False, None
    if args.compile:
        started = time.perf_counter()
        compiled = model.prepare_compiled_encoder()
        compile_seconds = round(time.perf_counter() - started, 1)
    volume = synthetic_ct(args.slices)
    interpret_volume(synthetic_ct(args.batch + 4), model, EngineConfig(batch_size=args.batch))  # warm-up
    model.timings.clear()
    start = time.perf_counter()
    result = interpret_volume(volume, model, EngineConfig(batch_size=args.batch))
    total = time.perf_counter() - start
    stages = {k: round(v, 3) for k, v in model.timings.items()}
    # Fresh heads rarely emit [SEG]: time the mask decoder on its own, for 4 masks per call.
    embeddings = model.encode(np.zeros((4, model.input_size, model.input_size), np.float32))
    hidden = torch.randn(4, model.network.config.hidden_size, device=device)
    with torch.inference_mode():
        model.network.decode_masks(embeddings, hidden)
        decoder_start = time.perf_counter()
        for _ in range(5):
            model.network.decode_masks(embeddings, hidden)
    seconds_per_mask = (time.perf_counter() - decoder_start) / 20
    figures = {
        "device": str(device), "threads": args.threads, "bf16": model.bf16, "batch": args.batch,
        "compiled_encoder": compiled, "compile_seconds": compile_seconds,
        "slices": args.slices, "interpreted": result.slices_interpreted, "skipped": result.slices_skipped,
        "seconds_total": round(total, 2), "seconds_by_stage": stages,
        "interpreted_slices_per_second": round(result.slices_interpreted / total, 3),
        "series_slices_per_second": round(args.slices / total, 3),
        "encoder_seconds_per_slice": round(stages.get("encoder", 0) / max(result.slices_interpreted, 1), 3),
        "language_model_seconds_per_slice": round(stages.get("language_model", 0) / max(result.slices_interpreted, 1), 4),
        "mask_decoder_seconds_per_mask": round(seconds_per_mask, 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
    }
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
