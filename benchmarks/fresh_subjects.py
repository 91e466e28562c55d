"""Quality on subjects no training run has seen: synthetic subjects of another seed, scored by the same
held-out evaluation as the model card (the node's engine, the checkpoint's operating point).

The card's held-out split was looked at while choosing the model's operating point (``min_lesion_slices``),
so its figures are a little optimistic; this is the check on fresh subjects.

    python -m benchmarks.fresh_subjects [--model models/default] [--seed 1] [--mr 10] [--ct 10]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from inference.model.builtin import BuiltinModel
from training.cache import CachedEncoderModel, EmbeddingCache
from training.evaluate import evaluate
from training.sources import SyntheticSpec, synthetic

FIGURES = ("lesion_sensitivity", "false_positives_per_volume", "mean_dice_detected_lesions", "finding_accuracy", "true_lesions", "volumes")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("models/default"))
    parser.add_argument("--seed", type=int, default=1, help="synthetic seed; the shipped model was trained on seed 0")
    parser.add_argument("--mr", type=int, default=10, help="head MRIs")
    parser.add_argument("--ct", type=int, default=10, help="CT phantoms")
    parser.add_argument("--data", type=Path, default=Path("data/training"), help="synthetic data and encoder cache")
    args = parser.parse_args()
    items = synthetic(args.data / "synthetic", SyntheticSpec(args.mr, args.ct, args.seed))
    model = BuiltinModel.load(args.model)
    metrics = evaluate(items, CachedEncoderModel(model, EmbeddingCache(args.data / "cache", model)))
    print(f"model {model.version} (min_lesion_slices {model.min_lesion_slices}), synthetic seed {args.seed}")
    for modality in ("MR", "CT"):
        if modality in metrics:
            print(modality, json.dumps({k: metrics[modality][k] for k in FIGURES}))


if __name__ == "__main__":
    main()
