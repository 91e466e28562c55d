"""The arguments and data shared by the benchmarks that score a checkpoint on synthetic subjects of a seed
the model was not trained on."""

from __future__ import annotations

import argparse
from pathlib import Path

from inference.model.builtin import BuiltinModel
from inference.model.precision import EncoderPrecision
from training.cache import EmbeddingCache
from training.sources import LabeledSeries, SyntheticSpec, held_out_subjects, synthetic, synthetic_subject


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
    parser.add_argument("--unseen-by", type=_counts, action="append", default=[], metavar="MR,CT",
                        help="only the subjects that a model trained by `train --synthetic --mr-subjects MR "
                             "--ct-subjects CT` (seed 0, its default split) did not train on; repeat it to compare "
                             "models trained on different counts on subjects neither has seen")


def subjects(args: argparse.Namespace, held_out: bool = False) -> tuple[list[LabeledSeries], BuiltinModel, EmbeddingCache]:
    """The subjects (written on first use), the checkpoint and its encoder cache. ``held_out``: only the
    subjects that `train` on all of them holds out, to score a card's own split again."""
    names = subject_names(args.mr, args.ct, held_out, args.unseen_by)
    items = synthetic(args.data / "synthetic", SyntheticSpec(args.mr, args.ct, args.seed), only=names)
    model = BuiltinModel.load(args.model, precision=args.precision)
    return items, model, EmbeddingCache(args.data / "cache", model)


def subject_names(mr: int, ct: int, held_out: bool = False, unseen_by: list[tuple[int, int]] = ()) -> set[str]:
    """The subjects scored, named before any is written (so a held-out split of 240 writes its 60, not 240):
    of ``mr`` head MRIs and ``ct`` phantoms, those `train` on all of them holds out (``held_out``; a quarter,
    training seed 0), less those that runs on the ``unseen_by`` counts trained on."""
    per_modality = [[synthetic_subject(m, i) for i in range(count)] for m, count in (("MR", mr), ("CT", ct))]
    names = set().union(*(held_out_subjects(n) if held_out else set(n) for n in per_modality))
    return names - set().union(*(trained_subjects(*counts) for counts in unseen_by))


def trained_subjects(mr_subjects: int, ct_subjects: int) -> set[str]:
    """The synthetic subjects that `train --synthetic` on these counts trains on: those its default split (a
    quarter held out, training seed 0) does not hold out."""
    trained: set[str] = set()
    for modality, count in (("MR", mr_subjects), ("CT", ct_subjects)):
        names = [synthetic_subject(modality, i) for i in range(count)]
        trained |= set(names) - held_out_subjects(names)
    return trained


def _counts(text: str) -> tuple[int, int]:
    try:
        mr, ct = (int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MR,CT subject counts such as 80,80, not {text!r}") from None
    if mr < 0 or ct < 0:
        raise argparse.ArgumentTypeError(f"subject counts cannot be negative: {text!r}")
    return mr, ct
