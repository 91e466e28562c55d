"""`dicom-node model list|activate|combine|point`: the versions a node may answer with, and how an admin picks one."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dicom_node.cli_types import (Given, aligned_overlap_argument, count_argument, lesion_slices_argument,
                                  mask_threshold_argument, optional, reliability_cuts_argument, version_argument)
from dicom_node.config import NodeConfig
from inference.model.card import CARD_FILE, LESION_RULES, LEVELS, ModelCard

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


@contextmanager
def registry(config: NodeConfig, writer: bool = False) -> Iterator[Session]:
    """A session on the node's database for the registry (in one transaction where it writes), its engine
    disposed after: each command here opens it once."""
    from storage.database import opened

    with (opened(config.storage.database_url, writer=writer) as sessions, sessions() as session,
          session.begin() if writer else nullcontext()):
        yield session


class ModelChoiceError(ValueError):
    """A model named on the command line that is not there: no such version, or a folder without a readable card."""


def add_commands(commands: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    model = commands.add_parser("model", parents=[common], help="list the models, activate one")
    actions = model.add_subparsers(title="model commands", metavar="ACTION")
    listing = actions.add_parser("list", parents=[common], help="the shipped model and every trained version, with their figures")
    listing.set_defaults(func=list_command)
    activate = actions.add_parser("activate", parents=[common], help="make a version the one routes with model = \"active\" use")
    activate.add_argument("version", metavar="VERSION", help='a version from `model list`, or "shipped"')
    activate.set_defaults(func=activate_command)
    combine = actions.add_parser("combine", parents=[common],
                                 help="one ensemble checkpoint from several trained runs (their answers averaged)")
    combine.add_argument("version", type=version_argument, metavar="VERSION", help="the ensemble's version")
    combine.add_argument("models", nargs="+", metavar="MODEL",
                         help='two or more: "shipped", "active", versions from `model list` or checkpoint folders; '
                              "the first's card, operating point and labels are the ensemble's")
    combine.add_argument("--modality", action="append", metavar="MODALITY",
                         help="average only for this modality (repeat for several); others are answered by the first "
                              "model alone (default: every modality the first shares with each other)")
    combine.add_argument("--out", type=Path, help="checkpoint folder (default: <storage>/models/<version>)")
    combine.add_argument("--no-register", action="store_true", help="do not record the version in the node's database")
    combine.set_defaults(func=combine_command)
    point = actions.add_parser("point", parents=[common],
                               help="a model at another operating point (e.g. one chosen on validation subjects), as a "
                                    "new version: the same weights, a new card; registered, never activated")
    point.add_argument("version", type=version_argument, metavar="VERSION", help="the new version's name")
    point.add_argument("model", metavar="MODEL",
                       help='"shipped", "active", a version from `model list` or a checkpoint folder')
    point.add_argument("--mask-threshold", type=optional(mask_threshold_argument), metavar="P|MOD=P,...|none",
                       help="decoder probability above which a pixel is in a mask, for all modalities or per modality, "
                            "e.g. MR=0.4 (others: the architecture's); none: the architecture's for every modality")
    point.add_argument("--min-mask-pixels", type=count_argument(1), metavar="PIXELS",
                       help="the smallest first mask, in model-grid pixels, that makes a slice's answer a finding")
    point.add_argument("--min-lesion-slices", type=lesion_slices_argument, metavar="N|MOD=N,...",
                       help="3D lesions seen on fewer slices are dropped, e.g. CT=3,MR=3")
    point.add_argument("--aligned-overlap", type=optional(aligned_overlap_argument), metavar="F|MOD=F,...|none",
                       help="a shorter lesion of at least two slices is kept where its slice masks overlap by this "
                            "fraction of the smaller, e.g. CT=0.75; none: never kept")
    point.add_argument("--reliability-cuts", type=reliability_cuts_argument, metavar="HIGH,LOW",
                       help="uncertainty below which a finding's reliability is high, and above which it is low, "
                            "e.g. 0.2,0.45 (benchmarks.reliability_study chooses them on validation subjects)")
    point.add_argument("--stability-weight", type=float, metavar="W",
                       help="how much the decoder's doubt (1 - the mask's stability score) adds to the sampled "
                            "answers' semantic entropy; 0: entropy alone")
    point.add_argument("--lesion-rule", choices=LESION_RULES,
                       help="a 3D lesion's reliability: its most doubtful slice's level (worst), or the level of its "
                            "slices' median uncertainty (median)")
    point.add_argument("--short-lesion-cap", choices=LEVELS,
                       help="the best reliability of a lesion shorter than --min-lesion-slices that --aligned-overlap "
                            "keeps (high: no cap)")
    point.add_argument("--out", type=Path, help="checkpoint folder (default: <storage>/models/<version>)")
    point.add_argument("--no-register", action="store_true", help="do not record the version in the node's database")
    point.set_defaults(func=point_command)


@dataclass(frozen=True)
class StartingCheckpoint:
    path: Path
    card: ModelCard


def starting_checkpoint(config: NodeConfig, name: str, option: str = "--start-from") -> StartingCheckpoint:
    """The checkpoint a command names (``option`` says which, in the error): "shipped", "active", a registered
    version or a folder (read, not written)."""
    from dicom_node.model_registry import UnknownModelError, find_model

    try:
        with registry(config) as session:
            path = find_model(session, name)
    except UnknownModelError as exc:
        raise ModelChoiceError(f"{option}: no model {exc} (see dicom-node model list)") from None
    try:
        return StartingCheckpoint(path, ModelCard.from_json((path / CARD_FILE).read_text()))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise ModelChoiceError(f"{option}: {path} holds no readable model card ({exc})") from None


def check_new_version(config: NodeConfig, version: str, no_register: bool) -> None:
    """Refuse, before a checkpoint is written, a version that registering would have to rebind (VersionTakenError)."""
    from dicom_node.model_registry import check_new_version as check
    from storage.database import missing_database

    if no_register or missing_database(config.storage.database_url) is not None:
        return  # a node that never ran has nothing registered (and opening would create its database)
    with registry(config) as session:
        check(session, version)


def registered(config: NodeConfig, out: Path, version: str, no_register: bool) -> str:
    """Record a written checkpoint in the node's database as a version an admin may activate (never active),
    unless asked not to; the words that say so after "written to <out>"."""
    if no_register:
        return ""
    from dicom_node.model_registry import VersionTakenError, register

    try:
        with registry(config, writer=True) as session:
            register(session, out, version)
    except VersionTakenError as exc:  # taken while this command ran (checked at its start): the checkpoint stays
        return f", not registered: {exc}"
    return f" and registered (not active: dicom-node model activate {version})"


def skipped_note(metrics: dict) -> str:
    """"; 2 series skipped ...", where series could not be placed in training or evaluation (else ""): `train`
    and `model list` say so, so that an admin sees it before activating the version."""
    skipped = metrics.get("training", {}).get("skipped_series", []) + metrics.get("all", {}).get("skipped_series", [])
    return f"; {len(skipped)} series skipped: they cannot be placed (the warnings name them, the card says why)" if skipped else ""


def list_command(config: NodeConfig, _args: argparse.Namespace) -> int:
    from dicom_node.model_registry import list_models, shipped_entry
    from storage.database import missing_database

    if missing_database(config.storage.database_url) is not None:
        entries = [shipped_entry(active=True)]  # a node that never ran: nothing registered, none activated
    else:
        with registry(config) as session:
            entries = list_models(session)
    for entry in entries:
        mark = "*" if entry.active else " "
        if entry.card is None:
            print(f"{mark} {entry.version:24} {entry.path} (no checkpoint there)")
            continue
        figures = {m: entry.card.metrics.get(m, {}) for m in entry.card.modalities}
        shown = "; ".join(f"{m}: sensitivity {v.get('lesion_sensitivity')}, FP/volume {v.get('false_positives_per_volume')}, "
                          f"Dice {v.get('mean_dice_detected_lesions')}" for m, v in figures.items() if v)
        kind = f", an ensemble of {len(entry.card.members) + 1} runs" if entry.card.members else ""
        print(f"{mark} {entry.version:24} {entry.card.name} {entry.card.version} ({', '.join(entry.card.modalities)}{kind}) "
              f"{shown}{skipped_note(entry.card.metrics)}")
        print(f"  {'':24} {entry.path}")
    print("* = active (used by routes with model = \"active\")")
    return 0


def combine_command(config: NodeConfig, args: argparse.Namespace) -> int:
    from dicom_node.model_registry import VersionTakenError
    from inference.model.litemedsam import WeightsError
    from training.ensemble import EnsembleError, combine

    out = args.out or config.storage.path / "models" / args.version
    try:
        check_new_version(config, args.version, args.no_register)
        folders = [starting_checkpoint(config, name, "model").path for name in args.models]
        combine(folders, out, args.version, tuple(m.upper() for m in args.modality) if args.modality else None)
    except (ModelChoiceError, VersionTakenError, EnsembleError, WeightsError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return _announce(config, args, f"ensemble {args.version} of {len(folders)} models", out,
                     "subjects none of its runs trained on", "Ensembles")


def point_command(config: NodeConfig, args: argparse.Namespace) -> int:
    from inference.model.litemedsam import WeightsError
    from training.repoint import KEEP, PointChange, repoint

    def kept(value: object) -> object:  # not given: the source's setting; Given (may be "none"): its value
        return KEEP if value is None else value.value if isinstance(value, Given) else value

    given = {"stability_weight": args.stability_weight, "lesion_rule": args.lesion_rule,
             "short_lesion_cap": args.short_lesion_cap}  # ReliabilityPolicy fields named as their options
    reliability = ({} if args.reliability_cuts is None else dict(zip(("high_below", "low_above"), args.reliability_cuts))) \
        | {name: value for name, value in given.items() if value is not None}
    change = PointChange(mask_threshold=kept(args.mask_threshold), min_mask_pixels=kept(args.min_mask_pixels),
                         min_lesion_slices=kept(args.min_lesion_slices), aligned_lesion_overlap=kept(args.aligned_overlap),
                         reliability=reliability or KEEP)
    out = args.out or config.storage.path / "models" / args.version
    try:
        check_new_version(config, args.version, args.no_register)  # a VersionTakenError is a ValueError
        source = starting_checkpoint(config, args.model, "model").path
        repoint(source, out, args.version, change)
    except (ModelChoiceError, WeightsError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return _announce(config, args, f"model {args.version} ({source}'s weights at a new operating point)", out,
                     "held-out subjects", "Operating point")


def _announce(config: NodeConfig, args: argparse.Namespace, written: str, out: Path, scoring: str, section: str) -> int:
    """Say where a new version went (registered unless asked not to) and that it needs scoring before use: a
    card written by `combine` or `point` has no held-out figures of its own."""
    print(f"{written} written to {out}" + registered(config, out, args.version, args.no_register))
    print(f"{args.version}'s card has no held-out figures yet: score it on {scoring} before activating it "
          f"(README, {section})")
    return 0


def activate_command(config: NodeConfig, args: argparse.Namespace) -> int:
    from dicom_node.model_registry import DamagedModelError, UnknownModelError, activate

    try:
        with registry(config, writer=True) as session:
            path = activate(session, args.version)
    except UnknownModelError as exc:
        print(f"error: no model {exc} (see dicom-node model list)", file=sys.stderr)
        return 2
    except DamagedModelError as exc:
        print(f"error: {args.version} cannot be activated: {exc}; the active model is unchanged", file=sys.stderr)
        return 2
    print(f"model {args.version} ({path}) is active; the running node uses it from its next job")
    return 0
