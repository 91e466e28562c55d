"""The arguments and data shared by the benchmarks that score a checkpoint on synthetic subjects of a seed
the model was not trained on."""

from __future__ import annotations

import argparse
from pathlib import Path

from inference.model.builtin import BuiltinModel
from inference.model.precision import EncoderPrecision
from training.cache import EmbeddingCache
from training.sources import LabeledSeries, SyntheticSpec, split_by_subject, synthetic


def add_subject_arguments(parser: argparse.ArgumentParser, seed: int) -> None:
    parser.add_argument("--model", type=Path, default=Path("models/default"))
    parser.add_argument("--seed", type=int, default=seed, help=f"synthetic seed of the subjects (default {seed}; "
                                                               "the shipped model was trained and tested on seed 0)")
    parser.add_argument("--mr", type=int, default=10, help="head MRIs")
    parser.add_argument("--ct", type=int, default=10, help="CT phantoms")
    parser.add_argument("--data", type=Path, default=Path("data/training"), help="synthetic data and encoder cache")
    parser.add_argument("--precision", choices=[p.value for p in EncoderPrecision], default="card",
                        help="the encoder's precision: as the card says it was trained (default), as the node's "
                             "\"auto\" picks it on this machine, or another")


def subjects(args: argparse.Namespace, held_out: bool = False) -> tuple[list[LabeledSeries], BuiltinModel, EmbeddingCache]:
    """The subjects (written on first use), the checkpoint and its encoder cache. ``held_out``: only the
    subjects that `train` on all of them holds out, to score a card's own split again."""
    items = synthetic(args.data / "synthetic", SyntheticSpec(args.mr, args.ct, args.seed))
    if held_out:
        items = split_by_subject(items)[1]  # as `train` splits by default (a quarter, training seed 0)
    model = BuiltinModel.load(args.model, precision=args.precision)
    return items, model, EmbeddingCache(args.data / "cache", model)
