"""Where a checkpoint loses its lesion figures: every true lesion and every false one, at the card's point.

    python -m benchmarks.lesion_errors [--model models/default] [--seed 1] [--mr 10] [--ct 10] [--data DIR]
                                       [--held-out] [--precision card|auto|bf16|fp32]

One engine pass per series (as ``training.evaluate`` runs it, encoder outputs from the cache). Prints, per
modality and worst Dice first, each true lesion (``training.lesion_errors.LesionError``: size, slices found
in reported lesions, slices drawn at all (a lesion drawn on fewer slices than the card's rule is dropped),
Dice, recall, precision, contrast with its surroundings, missed minus found intensity), then the false
lesions, then the mean Dice of detected lesions by size (smaller and larger half). Seed 1 (the validation
subjects) by default: diagnose where choices are made, not on the held-out split the card reports.
"""

from __future__ import annotations

import argparse

import numpy as np

from benchmarks.subjects import add_subject_arguments, subjects
from inference.engine import EngineConfig, interpret_volume
from inference.model.protocol import Interpretation
from inference.preprocess import SliceTransform
from inference.slicing import load_series
from training.cache import CachedEncoderModel
from training.evaluate import body_part, read_truth
from training.lesion_errors import FalseLesion, LesionError, lesion_errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_subject_arguments(parser, seed=1)
    parser.add_argument("--held-out", action="store_true", help="only the subjects `train` holds out of these")
    args = parser.parse_args()
    items, model, cache = subjects(args, args.held_out)
    engine_model, config = CachedEncoderModel(model, cache), EngineConfig()
    rows: dict[str, list[tuple[str, LesionError]]] = {}
    false: dict[str, list[tuple[str, FalseLesion]]] = {}
    for item in items:
        volume = load_series(item.series)
        drawn = np.zeros(volume.voxels.shape, bool)

        def observe(k: int, interpretation: Interpretation, transform: SliceTransform) -> None:
            if len(interpretation.answer.masks):
                drawn[k] |= transform.mask_to_source(interpretation.answer.masks).any(axis=0)

        result = interpret_volume(volume, engine_model, config, body_part(item), observe=observe)
        errors, wrong = lesion_errors(volume, read_truth(item, volume, config.min_volume_ml), result.lesions, drawn)
        rows.setdefault(volume.modality, []).extend((item.subject, e) for e in errors)
        false.setdefault(volume.modality, []).extend((item.subject, f) for f in wrong)
    print(f"model {model.version}, synthetic seed {args.seed}{', held-out split' if args.held_out else ''}")
    for modality in sorted(rows):
        print(f"\n{modality}: subject  label  mL  slices found/drawn/of  Dice  recall  precision  contrast  missed-found")
        for subject, e in sorted(rows[modality], key=lambda row: row[1].dice):
            print(f"  {subject:14} {e.label:13} {e.volume_ml:7.2f} {e.found_slices:3d}/{e.drawn_slices}/{e.slices:<3d} {e.dice:5.2f}"
                  f" {e.recall:6.2f} {e.precision:8.2f} {e.contrast:9.0f} {e.missed_minus_found:9.0f}")
        for subject, f in false.get(modality, []):
            print(f"  false: {subject:14} {f.label:13} {f.volume_ml:7.2f} mL, {f.slices} slices from slice "
                  f"{f.first_slice}, contrast {f.contrast:.0f}")
        detected = [e for _, e in rows[modality] if e.detected]
        if detected:
            median = float(np.median([e.volume_ml for e in detected]))
            small = [e.dice for e in detected if e.volume_ml <= median]
            large = [e.dice for e in detected if e.volume_ml > median]
            print(f"{modality}: {len(detected)} of {len(rows[modality])} detected, mean Dice "
                  f"{np.mean([e.dice for e in detected]):.3f}; up to {median:.2f} mL {np.mean(small):.3f}"
                  + (f", larger {np.mean(large):.3f}" if large else ""))


if __name__ == "__main__":
    main()
