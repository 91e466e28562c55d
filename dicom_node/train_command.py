"""`dicom-node train`: the command-line side of training (the versions it writes: model_command)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
import sys
from datetime import date, datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy.exc import SQLAlchemyError

from dicom_node.cli_types import (aligned_overlap_argument, count_argument, lesion_slices_argument,
                                  mask_threshold_argument, presence_argument, version_argument)
from dicom_node.config import NodeConfig
from dicom_node.model_command import check_new_version, registered, skipped_note, starting_checkpoint

if TYPE_CHECKING:
    from inference.model.card import ModelCard
    from training.sources import LabeledSeries, SyntheticSpec

logger = logging.getLogger(__name__)


def add_commands(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    train = commands.add_parser("train", parents=[common],
                                help="train a model on series with ground-truth SEG; registers it, never activates it")
    train.add_argument("--synthetic", action="store_true", help="the built-in synthetic data (the default when no source is named)")
    train.add_argument("--mr-subjects", type=int, default=40, help="synthetic head MRIs (default 40)")
    train.add_argument("--ct-subjects", type=int, default=40, help="synthetic CT phantoms (default 40)")
    train.add_argument("--folder", type=Path, action="append", default=[], help="a folder of DICOM series and SEGs (repeatable)")
    train.add_argument("--from-store", action="store_true", help="series in the node's store with a ground-truth SEG")
    train.add_argument("--label", help="only series whose SEG has a segment label containing this text")
    train.add_argument("--modality", help="only this modality (CT, MR)")
    train.add_argument("--since", type=date.fromisoformat,
                       help="with --from-store: only studies from this date (YYYY-MM-DD) on, by the Study Date the "
                            "node indexed (a --folder is trained on as exported)")
    train.add_argument("--out", type=Path, help="checkpoint folder (default: <storage>/models/<version>)")
    train.add_argument("--version", type=version_argument,
                       help="version name: letters, digits, '.', '_', '-' (default: train-<UTC time>)")
    train.add_argument("--steps", type=count_argument(1), help="optimiser steps (default: the trainer's, 600)")
    train.add_argument("--hard-negative-steps", type=count_argument(0), default=0, metavar="N",
                       help="after --steps, N more steps in which half of each batch's clear slices are those on which "
                            "the model still draws a lesion (hard negatives, mined once; training/hard_negatives.py); "
                            "default 0: none")
    train.add_argument("--hard-negative-cycles", type=count_argument(1), default=1, metavar="N",
                       help="split the hard-negative steps into N equal cycles, each restarting the learning rate and "
                            "mining again (default 1)")
    train.add_argument("--average-cycles", action="store_true",
                       help="the model's weights: the mean of the weights at each hard-negative cycle's end")
    train.add_argument("--lesion-weight", type=float, default=1.0, metavar="W",
                       help="weight of a finding's lesion pixels in the mask BCE (pos_weight): above 1 a missed lesion "
                            "pixel costs W times a false one (default 1, the paper's loss)")
    train.add_argument("--feature-dropout", type=float, default=0.0, metavar="P",
                       help="drop each channel of the cached encoder features with probability P in training, against "
                            "heads that learn the training slices' fixed encodings by heart (default 0: none)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--min-lesion-slices", type=lesion_slices_argument, metavar="N|MOD=N,...",
                       help="the model's operating point: 3D lesions seen on fewer slices are dropped, for all "
                            "modalities or per modality, e.g. CT=2,MR=3 (default 2, or --start-from's)")
    train.add_argument("--aligned-overlap", type=aligned_overlap_argument, metavar="F|MOD=F,...",
                       help="the model's operating point: a lesion on fewer slices than --min-lesion-slices, but at "
                            "least two, is kept when its consecutive slice masks overlap by this fraction of the "
                            "smaller, for all modalities or per modality, e.g. CT=0.9 (default: never kept, or --start-from's)")
    train.add_argument("--mask-threshold", type=mask_threshold_argument, metavar="P|MOD=P,...",
                       help="the model's operating point: the decoder probability above which a pixel is in a mask, "
                            "per modality, e.g. MR=0.4 (default: the architecture's 0.5, or --start-from's)")
    train.add_argument("--min-mask-pixels", type=int, metavar="PIXELS",
                       help="the model's operating point: the smallest first mask, in model-grid pixels, that makes a "
                            "slice's answer a finding (GroundedConfig.min_mask_pixels); default: the trainer's, 5")
    train.add_argument("--presence", type=presence_argument, nargs="?", const=0.5, metavar="THRESHOLD",
                       help="train the decoder's presence head and gate findings on it (GroundedConfig.presence; "
                            "threshold default 0.5); off by default, as in the shipped model")
    train.add_argument("--mirror", action="store_true",
                       help="train on left-right mirrored copies of every slice too, and answer each slice averaged "
                            "with its mirror (GroundedConfig.mirror; the encoder runs twice per slice); off by default")
    train.add_argument("--detail", type=int, metavar="WIDTH",
                       help="the detail branch's width (a trainable CNN on the full-resolution slice beside the frozen "
                            "encoder; GroundedConfig.detail_width, 0: none); default: the trainer's architecture")
    train.add_argument("--context", type=int, metavar="N",
                       help="neighbouring slices each side the detail branch sees (2.5D; GroundedConfig.context_slices)")
    train.add_argument("--encoder-precision", choices=("fp32", "bf16"),
                       help="precision of the frozen encoder in training and, through the card, when the model answers: "
                            "fp32 (default, or --start-from's) runs alike on every CPU; bf16 is about 3x faster where "
                            "the CPU has native bf16 (AVX512-BF16) and 5x slower where it has not")
    train.add_argument("--autocast", action="store_true",
                       help="train the heads under bf16 autocast: about 1.5x faster on a GPU or a CPU with native "
                            "bf16 (AVX512-BF16, AMX), several times slower on CPUs without it")
    train.add_argument("--start-from", metavar="MODEL",
                       help='fine-tune: start from this model\'s trained weights, architecture and operating point, not '
                            'from fresh heads: "shipped", "active", a version from `model list`, or a checkpoint folder')
    train.add_argument("--learning-rate", type=float, metavar="LR",
                       help="peak learning rate of the heads, the mask decoder's scaled alike (default 1e-3 and 2e-4; "
                            "lower to fine-tune gently from --start-from)")
    train.add_argument("--resume", action="store_true", help="continue from the state saved in --out")
    train.add_argument("--data", type=Path, help="folder for synthetic data and the encoder cache (default: <storage>/training)")
    train.add_argument("--no-register", action="store_true", help="do not record the version in the node's database")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(func=train_command)


def train_command(config: NodeConfig, args: argparse.Namespace) -> int:
    from training.cache import CacheWriteError
    from training.run import TrainingDataError, TrainRequest, run_training
    from training.trainer import TrainConfig

    version = args.version or datetime.now(timezone.utc).strftime("train-%Y%m%d-%H%M%S")
    out = args.out or config.storage.path / "models" / version
    try:
        if args.since and not args.from_store:
            raise TrainingArgumentError("--since applies to --from-store, whose studies the node indexed by date; "
                                        "a --folder or the synthetic data is trained on as it is")
        train_config = TrainConfig(steps=args.steps or TrainConfig.steps, seed=args.seed, autocast=args.autocast,
                                   hard_negative_steps=args.hard_negative_steps,
                                   hard_negative_cycles=args.hard_negative_cycles, average_cycles=args.average_cycles,
                                   lesion_weight=args.lesion_weight, feature_dropout=args.feature_dropout,
                                   **learning_rates(args.learning_rate))
        if args.start_from:
            base = starting_checkpoint(config, args.start_from)
            architecture = fine_tuning_architecture(base.card, args.presence, args.mirror, args.detail, args.context,
                                                    args.min_mask_pixels, args.encoder_precision)
        else:
            base = None
            architecture = training_architecture(args.presence, args.mirror, args.detail, args.context, args.min_mask_pixels)
        check_new_version(config, version, args.no_register)  # a VersionTakenError is a ValueError
        check_out_folder(out, args.resume)
        for folder in args.folder:  # before any synthesis or encoding: "no labelled series" hid a typo
            if not folder.is_dir():
                raise TrainingArgumentError(f"--folder {folder} is not a folder")
    except (TrainingArgumentError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    data = args.data or config.storage.path / "training"
    # The operating point: as asked, else the starting model's (validated with it), else the trainer's.
    min_lesion_slices = args.min_lesion_slices or (base.card.min_lesion_slices if base else 2)
    aligned_overlap = args.aligned_overlap or (base.card.aligned_lesion_overlap if base else None)
    mask_threshold = args.mask_threshold or (base.card.mask_threshold if base else None)
    encoder_precision = base.card.encoder_precision if base else args.encoder_precision or "fp32"
    request = TrainRequest(out=out, cache=data / "cache", version=version, config=train_config, resume=args.resume,
                           min_lesion_slices=min_lesion_slices, aligned_lesion_overlap=aligned_overlap,
                           mask_threshold=mask_threshold, mirror=args.mirror, progress=not args.quiet,
                           start_from=base.path if base else None,
                           architecture=architecture, encoder_precision=encoder_precision,
                           device=config.jobs.device, command=card_command(args.command_line))
    try:
        items, described = labelled_series(config, args, data)
        card = run_training(items, dataclasses.replace(request, description=described))
    except (TrainingDataError, CacheWriteError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except SQLAlchemyError:
        raise  # the CLI says which database, in one line
    except Exception as exc:  # noqa: BLE001 - the command's boundary: the nightly job logs only its "error:" lines
        logger.exception("training stopped")
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else "(no message)"
        print(f"error: training stopped: {type(exc).__name__}: {reason}", file=sys.stderr)
        return 1
    print(f"model {version} written to {out}" + registered(config, out, version, args.no_register)
          + skipped_note(card.metrics))  # the first line: what the nightly job logs
    _print_metrics(card.metrics)
    return 0


def labelled_series(config: NodeConfig, args: argparse.Namespace, data: Path) -> tuple[list[LabeledSeries], str]:
    """(the series to train and evaluate on, the card's words for where they came from)."""
    from training.sources import SyntheticSpec, from_folder, synthetic

    items, described = [], []
    if args.synthetic or not (args.folder or args.from_store):
        spec = SyntheticSpec(args.mr_subjects, args.ct_subjects, args.seed)
        items += synthetic(data / "synthetic", spec)
        described.append(synthetic_description(spec))
    for number, folder in enumerate(args.folder, 1):
        found = from_folder(folder, args.modality, args.label)
        items += found
        described.append(f"folder {number}: {len(found)} labelled series")  # not its path: see card_command
    if args.from_store:
        items += stored_series(config, args.modality, args.label, args.since)
        described.append("the node's store" + (f" since {args.since}" if args.since else ""))
    if args.modality:
        items = [i for i in items if i.modality.upper() == args.modality.upper()]
    return items, "; ".join(described)


def stored_series(config: NodeConfig, modality: str | None, label: str | None, since: date | None) -> list[LabeledSeries]:
    """--from-store's series: those in the node's index with a ground-truth SEG, as training reads them."""
    from storage.database import opened
    from training.sources import from_store

    with opened(config.storage.database_url) as sessions, sessions() as session:
        return from_store(session, config.storage.path, modality, label, since)


def synthetic_description(spec: SyntheticSpec) -> str:
    """The card's words for the synthetic data, naming only the kinds a run had (an MR-only run's card said
    "0 CT phantoms (abdomen: liver and kidney tumours ...)")."""
    kinds = [f"{spec.mr_subjects} head MRIs (Colin27 and MNI152 anatomy) with brain tumours"] if spec.mr_subjects else []
    if spec.ct_subjects:
        kinds.append(f"{spec.ct_subjects} CT phantoms (abdomen: liver and kidney tumours; chest: lung nodules)")
    return f"synthetic: {', '.join(kinds) or 'no subjects'}, about a quarter without lesions"


def card_command(argv: list[str]) -> str:
    """The training command as the card records it, each ``--folder`` path written FOLDER1, FOLDER2, ...: a card
    travels with its model (to `model list`, to whoever the site shares it with), and hospital exports are often
    foldered by patient name or ID. Abbreviations argparse accepts (``--fold``, ``--folder=X``) are caught too."""
    recorded, folders, value_next = [], 0, False
    for token in argv:
        option, equals, _ = token.partition("=")
        if value_next:
            value_next = False
            recorded.append(f"FOLDER{folders}")
        elif len(option) >= 4 and "--folder".startswith(option):  # "--fo" is unique to --folder among train's options
            folders += 1
            recorded.append(f"{option}=FOLDER{folders}" if equals else token)
            value_next = not equals
        else:
            recorded.append(shlex.quote(token))
    return "dicom-node " + " ".join(recorded)


def check_out_folder(out: Path, resume: bool) -> None:
    """Refuse an --out that holds files (another run's checkpoint or state) unless --resume continues the run
    saved there."""
    if not resume and out.is_dir() and any(out.iterdir()):
        raise TrainingArgumentError(f"{out} holds files already: write the new version to a new folder, or add "
                                    "--resume to continue the run saved there")


def training_architecture(presence: float | None, mirror: bool = False, detail: int | None = None,
                          context: int | None = None, min_mask_pixels: int | None = None) -> dict:
    """The trainer's default architecture, with the presence head on at ``presence`` where given, mirror
    averaging where asked for, the detail branch's width and context and the smallest finding mask where
    given (checked by GroundedConfig: a clear error, not a model that cannot be built)."""
    from training.run import DEFAULT_ARCHITECTURE

    architecture = dict(DEFAULT_ARCHITECTURE)
    if mirror:
        architecture["mirror"] = True
    if presence is not None:
        architecture |= {"presence": True, "presence_threshold": presence}
    if detail is not None:
        architecture["detail_width"] = detail
        if not detail:
            architecture["context_slices"] = 0
    if context is not None:
        architecture["context_slices"] = context
    if min_mask_pixels is not None:
        architecture["min_mask_pixels"] = min_mask_pixels
    return _checked_architecture(architecture)


def fine_tuning_architecture(base: ModelCard, presence: float | None, mirror: bool, detail: int | None,
                             context: int | None, min_mask_pixels: int | None, encoder_precision: str | None) -> dict:
    """The starting model's architecture, which its weights fit; only the operating point may change (the
    smallest finding mask, mirror averaging), checked as a fresh run's is. Options that would change its shape
    are refused, not ignored."""
    reshaping = [name for name, value in (("--presence", presence), ("--detail", detail), ("--context", context)) if value is not None]
    if reshaping:
        raise TrainingArgumentError(f"{', '.join(reshaping)} would change the shape of the model --start-from gives; "
                                    "train from scratch (without --start-from) for another architecture")
    if encoder_precision is not None and encoder_precision != base.encoder_precision:
        raise TrainingArgumentError(f"--encoder-precision {encoder_precision}: the model --start-from gives was trained "
                                    f"on a {base.encoder_precision} encoder")
    architecture = dict(base.architecture)
    if mirror:
        architecture["mirror"] = True
    if min_mask_pixels is not None:
        architecture["min_mask_pixels"] = min_mask_pixels
    return _checked_architecture(architecture)


def _checked_architecture(architecture: dict) -> dict:
    """``architecture`` if GroundedConfig builds it: a clear error before training, not a model that cannot be built."""
    from inference.model.grounded import GroundedConfig

    try:
        GroundedConfig(**architecture)
    except ValueError as exc:
        raise TrainingArgumentError(str(exc)) from None
    return architecture


def learning_rates(heads: float | None) -> dict[str, float]:
    """TrainConfig's learning rates for --learning-rate: the heads' as given, the decoder's in the trainer's ratio
    (TrainConfig checks them)."""
    from training.trainer import TrainConfig

    if heads is None:
        return {}
    return {"learning_rate": heads, "decoder_learning_rate": heads * TrainConfig.decoder_learning_rate / TrainConfig.learning_rate}


class TrainingArgumentError(ValueError):
    """Training options that do not make a model (e.g. neighbours without a detail branch)."""


def _print_metrics(metrics: dict) -> None:
    keys = ("lesion_sensitivity", "false_positives_per_volume", "mean_dice_detected_lesions", "finding_accuracy",
            "answer_finding_accuracy", "slice_dice", "bleu1", "meteor", "rouge_l")
    for group, values in metrics.items():
        if group == "training":
            continue
        shown = ", ".join(f"{k} {values.get(k)}" for k in keys)
        print(f"  {group:4} {values.get('volumes')} volumes: {shown}")
