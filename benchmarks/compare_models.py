"""Two checkpoints side by side: did a retraining reproduce a model? The held-out figures of both cards, with
each difference also counted in lesions and false positives (a card's rates hide how few lesions a split
has: on 20 volumes one lesion is 0.04-0.07 of sensitivity, one false positive 0.05 per volume), how far
apart the trainable weights are (bit-equal tensors, the largest relative difference; an ensemble's members
too), and the verdict: whether the second card's four headline figures lie within the noise of one training
run of the first's (NOISE) in every modality the first was scored on.

    python -m benchmarks.compare_models models/default /path/to/retrained

Exit status 0: within noise; 1: outside it, or a headline figure missing from the second card, or the two
scored on different splits (then nothing can be judged).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from inference.model.card import CARD_FILE, WEIGHTS_FILE, ModelCard

# How far two trainings of one recipe land apart on the held-out split at one point: the largest differences
# measured between a shipped run and its fresh-clone retraining, per modality (docs/model-history.md:
# "Reproduction of 1.4.0", 1.4.0's command against 1.4.1's card, runs 17 and 18): 2 lesions, 2 false positives,
# 0.025 in the Dice of detected lesions, 0.031 in finding accuracy (rounded up to 0.035). Counts, not rates,
# where a figure is a rate over lesions or volumes. (1.3.0's point, before the hard-negative phase, measured 8 CT
# false positives: the band is for recipes with that phase, as the shipped model's.)
NOISE = {"lesion_sensitivity": 2, "false_positives_per_volume": 2, "mean_dice_detected_lesions": 0.025,
         "finding_accuracy": 0.035}
COUNTED_OVER = {"lesion_sensitivity": ("true_lesions", "lesions"),
                "lesion_part_sensitivity": ("true_lesion_parts", "parts"),
                "false_positives_per_volume": ("volumes", "false positives")}
FIGURES = ("lesion_sensitivity", "false_positives_per_volume", "mean_dice_detected_lesions", "finding_accuracy",
           "answer_finding_accuracy", "lesion_part_sensitivity", "slice_dice", "bleu1", "meteor", "rouge_l")


@dataclass(frozen=True)
class FigureRow:
    modality: str
    figure: str
    first: float | None
    second: float | None
    counted: str  # the difference in lesions or false positives where the figure is a rate over them; else ""


@dataclass(frozen=True)
class WeightsDifference:
    tensors: int
    bit_equal: int
    largest_relative: float  # ||a - b|| / ||a|| of the tensor where that is largest
    largest_relative_name: str


def _counted(figure: str, first_metrics: dict, second_metrics: dict, first: float, second: float) -> str:
    """The difference as a number of lesions, lesion parts or false positives, for the rates over them; only
    where both cards counted over as many (the same split), else a count would mislead."""
    base = COUNTED_OVER.get(figure)
    if base is None or first_metrics.get(base[0]) is None or first_metrics.get(base[0]) != second_metrics.get(base[0]):
        return ""
    return f"{(second - first) * first_metrics[base[0]]:+.0f} {base[1]}"


def compare_cards(first: ModelCard, second: ModelCard) -> list[FigureRow]:
    """Every held-out figure of both cards, by modality (those of the first card, in a fixed order)."""
    rows = []
    for modality in sorted(first.metrics):
        if modality in ("all", "training"):  # "all" repeats the modalities; "training" is the run's record
            continue
        a, b = first.metrics[modality], second.metrics.get(modality, {})
        for figure in FIGURES:
            x, y = a.get(figure), b.get(figure)
            counted = _counted(figure, a, b, x, y) if x is not None and y is not None else ""
            rows.append(FigureRow(modality, figure, x, y, counted))
    return rows


def outside_noise(first: ModelCard, second: ModelCard) -> list[str]:
    """Why the second card does not reproduce the first's headline figures within NOISE ([] where it does):
    a figure outside the band, missing, or scored over another number of lesions or volumes."""
    problems = []
    for modality in sorted(set(first.metrics) - {"all", "training"}):
        a, b = first.metrics[modality], second.metrics.get(modality, {})
        for figure, band in NOISE.items():
            x, y = a.get(figure), b.get(figure)
            if x is None:
                continue  # the first card was not scored on it: nothing to reproduce
            if y is None:
                problems.append(f"{modality} {figure}: missing from the second card")
                continue
            over = COUNTED_OVER.get(figure)
            if over is None:
                difference, unit = y - x, ""
            elif a.get(over[0]) is None or a.get(over[0]) != b.get(over[0]):
                problems.append(f"{modality} {figure}: scored over {a.get(over[0])} and {b.get(over[0])} {over[0]}")
                continue
            else:
                difference, unit = round((y - x) * a[over[0]], 6), f" {over[1]}"
            if abs(difference) > band:
                problems.append(f"{modality} {figure}: {x:.4g} -> {y:.4g} ({difference:+.4g}{unit}, noise {band}{unit})")
    return problems


def weight_files(card: ModelCard) -> list[str]:
    """The checkpoint's weight files: its own heads, then its ensemble members'."""
    return [WEIGHTS_FILE, *(member.weights for member in card.members)]


def compare_weights(first: Path, second: Path) -> WeightsDifference:
    """How far apart two checkpoints' trainable weights are. Raises ``ValueError`` where their tensors differ
    in name or shape: then they are not the same architecture and nothing compares."""
    a, b = load_file(str(first)), load_file(str(second))
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape for k in a):
        raise ValueError(f"{first} and {second} hold different tensors: not the same architecture")
    equal = sum(bool(torch.equal(a[k], b[k])) for k in a)
    relative = {k: ((a[k].float() - b[k].float()).norm() / a[k].float().norm().clamp_min(1e-12)).item() for k in a}
    name = max(relative, key=relative.__getitem__) if relative else ""
    return WeightsDifference(len(a), equal, relative.get(name, 0.0), name)


def _value(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _runs(card: ModelCard) -> list[dict]:
    """The training records of a card's runs: an ensemble's each, else its own."""
    training = card.metrics.get("training", {})
    return training.get("ensemble_of") or [training | {"version": card.version}]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first", type=Path, help="a checkpoint folder (the shipped one, say)")
    parser.add_argument("second", type=Path, help="another (a retraining of it)")
    args = parser.parse_args()
    cards = [ModelCard.from_json((folder / CARD_FILE).read_text()) for folder in (args.first, args.second)]
    print(f"| figure | {args.first} ({cards[0].version}) | {args.second} ({cards[1].version}) | difference |")
    print("|---|---|---|---|")
    for row in compare_cards(*cards):
        print(f"| {row.modality} {row.figure} | {_value(row.first)} | {_value(row.second)} | {row.counted} |")
    for card, folder in zip(cards, (args.first, args.second)):
        print(f"\n{folder}:")
        for record in _runs(card):
            print(f"  run {record.get('version', '-')}: final loss {record.get('final_loss', '-')}, "
                  f"{record.get('slices', '-')} training slices, {record.get('minutes', '-')} minutes")
    files = weight_files(cards[0])
    if weight_files(cards[1]) != files:
        print(f"\nweights: {args.second} holds {weight_files(cards[1])}, {args.first} {files}: not comparable")
    for name in files if weight_files(cards[1]) == files else []:
        weights = compare_weights(args.first / name, args.second / name)
        print(f"\nweights {name}: {weights.bit_equal} of {weights.tensors} tensors bit-equal; largest relative "
              f"difference {weights.largest_relative:.3g} ({weights.largest_relative_name})")
    problems = outside_noise(*cards)
    bands = ", ".join(f"{figure} {band}" for figure, band in NOISE.items())
    if problems:
        print(f"\nNOT within the noise of one training run ({bands}):\n  " + "\n  ".join(problems))
        return 1
    print(f"\nwithin the noise of one training run ({bands}) in every modality {args.first} was scored on")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
