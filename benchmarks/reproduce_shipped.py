"""Retrain the shipped model from this clone and set its held-out figures beside the shipped card's: issue 8's
"`dicom-node train` reproduces the shipped checkpoint's figures within noise from a fresh clone".

    python -m benchmarks.reproduce_shipped --work DIR [--dry-run] [--step NAME ...]

The recipe is read from the shipped card, not kept here, so it cannot drift from the model it reproduces:

1. every run the card records (``training.ensemble_of``, or the card's own training record): its
   ``dicom-node train`` command as recorded, with ``--out DIR/runs/<version>``, ``--data DIR/data`` and
   ``--resume``;
2. ``dicom-node model combine`` of those runs, the members answering the modalities the card gives them;
3. ``dicom-node model point`` at the card's operating point and reliability policy;
4. ``benchmarks.fresh_subjects --held-out --update-card`` on the card's held-out volumes (HELD_OUT);
5. ``benchmarks.compare_models`` of the shipped card and the new one.

Hours on 2 CPU cores (each run encodes its training slices and evaluates itself). Every step is resumable:
run the same command again after an interruption and it goes on (a finished run is not trained again, a
run cut off resumes from its ``state.pt`` and the encoder cache in ``DIR/data``).
"""

from __future__ import annotations

import argparse
import fcntl
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from inference.model.builtin import pick_device
from inference.model.card import CARD_FILE, ModelCard
from inference.model.precision import native_bf16

ROOT = Path(__file__).resolve().parents[1]  # where `dicom-node` finds config.toml
SHIPPED = ROOT / "models" / "default"
# The volumes the shipped card is scored on: the head MRIs the 160-subject runs hold out that the 80-subject run
# did not train on, and the 80-subject run's held-out CT phantoms (README, "The model the node ships with").
HELD_OUT = ("--seed", "0", "--mr", "160", "--ct", "80", "--held-out", "--unseen-by", "80,80")
SCORED = "scored"  # marks the scoring step done (the card it updates exists before it)
TRAINED = "history.json"  # `train` writes it last: its card exists, without held-out figures, while it evaluates
REPLACED = ("--out", "--data", "--version")  # options of a recorded command that the reproduction sets itself
DROPPED = ("--resume",)
LOCK_FILE = ".reproduction.lock"
# bf16 autocast of the heads' training. A device without native bf16 emulates it: on 2 AMD EPYC (AVX2) cores a
# bf16 256x1024x256 matmul took 516 ms against 10 in fp32, a 16-channel 256x256 convolution 3.2 s against 0.08,
# so a run recorded with it would take days there; such a reproduction trains those heads in fp32 (the other
# runs of the shipped model were), unless --as-recorded.
AUTOCAST = "--autocast"


class RecipeError(ValueError):
    """A card that does not say how its model was made (no recorded command, members of mixed modalities)."""


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]  # after the program: "dicom-node" or "python" (the running interpreter)
    program: str
    done: Path | None = None  # a file whose presence means the step has finished (the runner's marker where
    # the step writes none of its own)


def _records(card: ModelCard) -> list[dict]:
    """The training records of the runs whose heads the card holds, first run first."""
    training = card.metrics.get("training", {})
    records = training.get("ensemble_of") or [training | {"version": card.version}]
    if not all(r.get("command", "").startswith("dicom-node train ") for r in records):
        raise RecipeError(f"card {card.version} has a run without a recorded `dicom-node train` command")
    return records


def recorded_train(command: str, out: Path, data: Path, version: str, autocast: bool = True) -> tuple[str, ...]:
    """A recorded ``dicom-node train`` command's options, with this reproduction's folders and version (and
    ``--resume``, so that running the step again goes on where it stopped); without ``--autocast`` where
    ``autocast`` is False (AUTOCAST)."""
    tokens = shlex.split(command)[2:]
    dropped = DROPPED if autocast else (*DROPPED, AUTOCAST)
    kept, skip = [], False
    for token in tokens:
        option = token.split("=", 1)[0]
        if skip:
            skip = False
        elif option in REPLACED:
            skip = "=" not in token
        elif option not in dropped:
            kept.append(token)
    return ("train", *kept, "--version", version, "--out", str(out), "--data", str(data), "--resume")


def _point_value(value: float | int | dict | None) -> str:
    """A card's setting as `model point` reads it: "0.3", "CT=3,MR=3", or "none" for no setting."""
    if value is None:
        return "none"
    return ",".join(f"{m}={v}" for m, v in sorted(value.items())) if isinstance(value, dict) else str(value)


def point_options(card: ModelCard) -> tuple[str, ...]:
    """`model point`'s options that set a model to the card's operating point and reliability policy."""
    policy = card.reliability
    return ("--min-mask-pixels", str(card.architecture["min_mask_pixels"]),
            "--min-lesion-slices", _point_value(card.min_lesion_slices),
            "--aligned-overlap", _point_value(card.aligned_lesion_overlap),
            "--mask-threshold", _point_value(card.mask_threshold),
            "--reliability-cuts", f"{policy.high_below},{policy.low_above}",
            "--stability-weight", str(policy.stability_weight), "--lesion-rule", policy.lesion_rule,
            "--short-lesion-cap", policy.short_lesion_cap)


def reproduction_plan(card: ModelCard, work: Path, shipped: Path = SHIPPED, autocast: bool = True) -> list[Step]:
    """The steps that make the card's model again under ``work`` and compare it with ``shipped`` (its runs
    recorded with ``--autocast`` trained without it where ``autocast`` is False)."""
    data, model = work / "data", work / "model"
    records = _records(card)
    runs = [work / "runs" / r["version"] for r in records]
    steps = [Step(f"train {r['version']}", recorded_train(r["command"], out, data, r["version"], autocast), "dicom-node",
                  out / TRAINED) for r, out in zip(records, runs)]
    if card.members:
        modalities = {m.modalities for m in card.members}
        if len(modalities) != 1:
            raise RecipeError(f"card {card.version}'s members answer different modalities ({sorted(modalities)}): "
                              "`model combine` gives every member the same")
        combined = work / "combined"
        steps.append(Step("combine", ("model", "combine", f"{card.version}-combined", *map(str, runs),
                                      *(a for m in sorted(modalities.pop()) for a in ("--modality", m)),
                                      "--out", str(combined), "--no-register"), "dicom-node", combined / CARD_FILE))
        source = combined
    else:
        source = runs[0]
    steps.append(Step("point", ("model", "point", card.version, str(source), *point_options(card), "--out", str(model),
                                "--no-register"), "dicom-node", model / CARD_FILE))
    steps.append(Step("score", ("-m", "benchmarks.fresh_subjects", "--model", str(model), *HELD_OUT, "--data", str(data),
                                "--update-card"), "python", work / SCORED))
    steps.append(Step("compare", ("-m", "benchmarks.compare_models", str(shipped), str(model)), "python"))
    return steps


def _command(step: Step) -> list[str]:
    program = Path(sys.executable).with_name("dicom-node") if step.program == "dicom-node" else Path(sys.executable)
    return [str(program), *step.argv]


def chosen(steps: list[Step], names: list[str]) -> list[Step]:
    """The steps named (all where none is): the recipe takes longer than one sitting on 2 cores, so it can be
    run a step at a time, in any order that keeps each step after those it reads (runs, then combine, ...)."""
    if not names:
        return steps
    unknown = sorted(set(names) - {s.name for s in steps})
    if unknown:
        raise RecipeError(f"no step {', '.join(map(repr, unknown))}; the steps are {', '.join(repr(s.name) for s in steps)}")
    return [s for s in steps if s.name in names]


def locked(work: Path) -> int:
    """A descriptor holding ``work``'s lock: two reproductions in one folder would train into the same
    ``state.pt`` and cache files. Raises RecipeError where another (or a step it left running) holds it."""
    work.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(work / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise RecipeError(f"another reproduction, or a step one left running, is using {work}") from None
    return descriptor


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for the data, the encoder cache and the models")
    parser.add_argument("--dry-run", action="store_true", help="print the steps and stop")
    parser.add_argument("--step", action="append", default=[], metavar="NAME",
                        help='run only this step (repeatable), e.g. --step "train mr160"; --dry-run lists the names')
    parser.add_argument("--as-recorded", action="store_true",
                        help="keep --autocast where it was recorded even where this machine emulates bf16 (days on such CPUs)")
    args = parser.parse_args()
    card = ModelCard.from_json((SHIPPED / CARD_FILE).read_text())
    autocast = args.as_recorded or native_bf16(pick_device())
    if not autocast and any(AUTOCAST in shlex.split(r["command"]) for r in _records(card)):
        print(f"note: {pick_device()} has no native bf16: runs recorded with {AUTOCAST} train their heads in fp32 "
              "(--as-recorded keeps it)", flush=True)
    try:
        steps = chosen(reproduction_plan(card, args.work.resolve(), autocast=autocast), args.step)
        lock = None if args.dry_run else locked(args.work)
    except RecipeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for step in steps:
        finished = step.done is not None and step.done.exists()
        print(f"[{step.name}] {'done' if finished else 'run'}: {shlex.join(_command(step))}", flush=True)
        if finished or lock is None:
            continue
        # The step inherits the lock: a runner killed alone leaves its step running, and the folder locked with it.
        code = subprocess.run(_command(step), cwd=ROOT, pass_fds=(lock,)).returncode
        if code:
            print(f"[{step.name}] failed (exit {code}); the same command goes on from here", file=sys.stderr)
            return code
        if step.done is not None:
            step.done.touch()  # a no-op where the step wrote it; the scoring step writes into the point's card
    return 0


if __name__ == "__main__":
    sys.exit(main())
