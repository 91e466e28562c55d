"""Quality on subjects no training run and no choice has seen: synthetic subjects of another seed, scored by
the same held-out evaluation as the model card (the node's engine, the checkpoint's operating point).

Seed 0 is the training data and the card's held-out split; seed 1 is where the operating point is chosen
(``benchmarks.operating_point``); seed 2, this benchmark's default, is looked at by nothing else.

    python -m benchmarks.fresh_subjects [--model models/default] [--seed 2] [--mr 10] [--ct 10]
                                        [--precision card|auto|bf16|fp32] [--held-out [--update-card]]

``--held-out --update-card`` writes the figures into the checkpoint's own card (its training record kept): how a
card is scored again at a new operating point, or after the evaluation itself has changed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from benchmarks.subjects import add_subject_arguments, subjects
from inference.model.card import CARD_FILE, ModelCard
from storage.files import write_text_durably
from training.cache import CachedEncoderModel
from training.evaluate import evaluate

FIGURES = ("lesion_sensitivity", "lesion_part_sensitivity", "false_positives_per_volume", "mean_dice_detected_lesions",
           "finding_accuracy", "answer_finding_accuracy", "true_lesions", "volumes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_subject_arguments(parser, seed=2)
    parser.add_argument("--held-out", action="store_true",
                        help="only the subjects that `train` on these subjects holds out: the card's own split "
                             "(seed 0 with --mr 40 --ct 40 is the shipped model's), to score it again, for "
                             "example with another --precision")
    parser.add_argument("--update-card", action="store_true",
                        help="with --held-out: write the figures into the model's card (its training record kept)")
    args = parser.parse_args()
    if args.update_card and not args.held_out:
        parser.error("--update-card scores the card's own split: add --held-out")
    items, model, cache = subjects(args, args.held_out)
    metrics = evaluate(items, CachedEncoderModel(model, cache))
    if args.update_card:
        update_card(args.model, metrics)
    print(f"model {model.version} (min_lesion_slices {model.min_lesion_slices}, encoder {'bf16' if model.bf16 else 'fp32'}), "
          f"synthetic seed {args.seed}{', held-out split' if args.held_out else ''}")
    for modality in ("MR", "CT"):
        if modality in metrics:
            print(modality, json.dumps({k: metrics[modality][k] for k in FIGURES}))


def update_card(folder: Path, metrics: dict) -> None:
    """Replace the card's held-out figures, keeping what it records of its training."""
    card = ModelCard.from_json((folder / CARD_FILE).read_text())
    card = dataclasses.replace(card, metrics={**metrics, "training": card.metrics.get("training", {})})
    write_text_durably(folder / CARD_FILE, card.to_json())


if __name__ == "__main__":
    main()
