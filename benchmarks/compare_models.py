"""Two checkpoints side by side: did a retraining reproduce a model? The held-out figures of both cards, with
each difference also counted in lesions and false positives (a card's rates hide how few lesions a split
has: on 20 volumes one lesion is 0.04-0.07 of sensitivity, one false positive 0.05 per volume), and how far
apart the trainable weights are (bit-equal tensors, the largest relative difference).

    python -m benchmarks.compare_models models/default /path/to/retrained
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from inference.model.card import CARD_FILE, WEIGHTS_FILE, ModelCard

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
    base = {"lesion_sensitivity": ("true_lesions", "lesions"),
            "lesion_part_sensitivity": ("true_lesion_parts", "parts"),
            "false_positives_per_volume": ("volumes", "false positives")}.get(figure)
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


def main() -> None:
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
        record = card.metrics.get("training", {})
        print(f"\n{folder}: final loss {record.get('final_loss', '-')}, {record.get('slices', '-')} training slices, "
              f"{record.get('minutes', '-')} minutes")
    weights = compare_weights(args.first / WEIGHTS_FILE, args.second / WEIGHTS_FILE)
    print(f"\nweights: {weights.bit_equal} of {weights.tensors} tensors bit-equal; largest relative difference "
          f"{weights.largest_relative:.3g} ({weights.largest_relative_name})")


if __name__ == "__main__":
    main()
