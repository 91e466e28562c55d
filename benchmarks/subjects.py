"""The arguments and data shared by the benchmarks that score a checkpoint on synthetic subjects of a seed
the model was not trained on."""

from __future__ import annotations

import argparse
from pathlib import Path

from inference.model.builtin import BuiltinModel
from training.cache import EmbeddingCache
from training.sources import LabeledSeries, SyntheticSpec, synthetic


def add_subject_arguments(parser: argparse.ArgumentParser, seed: int) -> None:
    parser.add_argument("--model", type=Path, default=Path("models/default"))
    parser.add_argument("--seed", type=int, default=seed, help=f"synthetic seed of the subjects (default {seed}; "
                                                               "the shipped model was trained and tested on seed 0)")
    parser.add_argument("--mr", type=int, default=10, help="head MRIs")
    parser.add_argument("--ct", type=int, default=10, help="CT phantoms")
    parser.add_argument("--data", type=Path, default=Path("data/training"), help="synthetic data and encoder cache")


def subjects(args: argparse.Namespace) -> tuple[list[LabeledSeries], BuiltinModel, EmbeddingCache]:
    """The subjects (written on first use), the checkpoint and its encoder cache."""
    items = synthetic(args.data / "synthetic", SyntheticSpec(args.mr, args.ct, args.seed))
    model = BuiltinModel.load(args.model)
    return items, model, EmbeddingCache(args.data / "cache", model)
