"""Choose the operating point (mask_threshold, min_mask_pixels, presence_threshold, min_lesion_slices per
modality) on validation subjects: synthetic subjects of another seed than the one the model was trained and
tested on.

    python -m benchmarks.operating_point [--model models/default] [--seed 1] [--mr 10] [--ct 10] [--max-fp 0.2]
                                         [--thresholds 0.5,0.3] [--pixels 5,10,30] [--slices 1,2,3,4]
                                         [--presence 0.3,0.5,0.7,0.9] [--overlaps none,0.5,0.75,0.9]
                                         [--precision card|auto|bf16|fp32]

Prints every point's sensitivity, false positives per volume, Dice of detected lesions and finding accuracy
per modality, and the point ``training.operating_point.choose`` takes: the most sensitive within the
false-positive budget. Write the choice into training with ``dicom-node train --min-lesion-slices CT=N,MR=N``
(and ``--aligned-overlap CT=F`` where the chosen point keeps short aligned lesions).
"""

from __future__ import annotations

import argparse

from benchmarks.subjects import add_subject_arguments, subjects
from training.operating_point import choose, loosest_passes, score_point


def _numbers(text: str) -> list[int]:
    return [int(part) for part in text.split(",")]


def _fractions(text: str) -> list[float]:
    return [float(part) for part in text.split(",")]


def _overlaps(text: str) -> list[float | None]:
    return [None if part.strip().lower() == "none" else float(part) for part in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_subject_arguments(parser, seed=1)
    parser.add_argument("--max-fp", type=float, default=0.2, help="false-positive lesions per volume allowed")
    parser.add_argument("--thresholds", type=_fractions, default=[0.5],
                        help="mask_threshold values to try (one engine pass each)")
    parser.add_argument("--pixels", type=_numbers, default=[5, 10, 20, 30, 50], help="min_mask_pixels to try")
    parser.add_argument("--slices", type=_numbers, default=[1, 2, 3, 4], help="min_lesion_slices to try")
    parser.add_argument("--presence", type=_fractions, default=[0.3, 0.5, 0.7, 0.9],
                        help="presence_threshold values to try (models with presence only)")
    parser.add_argument("--overlaps", type=_overlaps, default=[None, 0.5, 0.75, 0.9],
                        help="aligned_lesion_overlap values to try (none: shorter lesions are never kept)")
    args = parser.parse_args()
    items, model, cache = subjects(args)
    passes = {t: loosest_passes(items, model, cache, t) for t in args.thresholds}
    config = model.network.config
    presences = args.presence if config.presence else [0.0]
    print(f"model {model.version}, validation: synthetic seed {args.seed}; card: mask_threshold {config.mask_threshold}, "
          f"min_mask_pixels {config.min_mask_pixels}, presence_threshold {config.presence_threshold if config.presence else '-'}, "
          f"min_lesion_slices {model.min_lesion_slices}, aligned_lesion_overlap {model.aligned_lesion_overlap}")
    for modality in sorted({p.modality for p in next(iter(passes.values()))}):
        scores = [score_point(passes[t], modality, pixels, slices, presence, aligned_overlap=overlap)
                  for t in args.thresholds for pixels in args.pixels for presence in presences for slices in args.slices
                  for overlap in ([None] if slices <= 2 else args.overlaps)]  # the rule keeps lesions of 2+ slices
        print(f"\n{modality}: threshold pixels presence slices overlap  sensitivity  FP/volume  Dice  finding accuracy")
        for s in scores:
            overlap = "-" if s.aligned_overlap is None else f"{s.aligned_overlap:.2f}"
            print(f"{'':4}{s.mask_threshold:9.2f} {s.min_mask_pixels:6d} {s.presence_threshold:8.2f} {s.min_lesion_slices:6d}"
                  f" {overlap:>7}  {s.sensitivity:11.4f}  {s.false_positives_per_volume:9.2f}  {s.mean_dice_detected:.4f}"
                  f"  {s.finding_accuracy:.4f}")
        best = choose(scores, args.max_fp)
        print(f"{modality} chosen: mask_threshold {best.mask_threshold}, min_mask_pixels {best.min_mask_pixels}, "
              f"presence_threshold {best.presence_threshold}, min_lesion_slices {best.min_lesion_slices}, "
              f"aligned_lesion_overlap {best.aligned_overlap}")


if __name__ == "__main__":
    main()
