"""What a finding's reliability could rest on, measured: per slice with a finding and per reported 3D lesion, the
signals the model gives (semantic entropy of sampled answers, the decoder's predicted IoU, the mask's stability
score, the lesion's extent) beside whether it was wrong, and how well each one ranks the wrong ones first (AUROC:
0.5 is chance, 1.0 puts every wrong one below every right one).

    python -m benchmarks.reliability_study [--model models/default] [--seed 1] [--mr 60] [--ct 20]
                                           [--held-out] [--unseen-by MR,CT] [--json FILE]
                                           [--from-json FILE] [--weight W ...] [--cuts HIGH,LOW]

For each stability weight (``--weight``; the card's ``reliability.stability_weight``) it chooses the cuts on
these slices (``choose_cuts``: "high" at most 10 % wrong, "low" at least half wrong), or scores ``--cuts``, and
prints the calibration tables the card would get, for slices and for reported lesions.

Seed 1 is where operating points are chosen (``benchmarks.operating_point``), so a reliability policy is chosen
there too; ``--held-out --seed 0`` shows how it holds on the card's own split.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from benchmarks.subjects import add_subject_arguments, subjects
from dicom_node.cli_types import reliability_cuts_argument
from inference.model.card import LESION_RULES, ReliabilityPolicy
from inference.reliability import lesion_uncertainty, level, with_decoder_doubt
from training.cache import CachedEncoderModel
from training.evaluate import SeriesRecord, evaluate_series


def auroc(wrong: list[bool], doubt: list[float]) -> float | None:
    """The probability that a wrong item has more ``doubt`` than a right one (ties count half); None
    where either kind is missing."""
    bad = np.array([d for d, w in zip(doubt, wrong) if w], dtype=float)
    good = np.array([d for d, w in zip(doubt, wrong) if not w], dtype=float)
    if not len(bad) or not len(good):
        return None
    greater = (bad[:, None] > good[None, :]).sum() + 0.5 * (bad[:, None] == good[None, :]).sum()
    return round(float(greater / (len(bad) * len(good))), 4)


def slice_rows(records: list[SeriesRecord]) -> list[dict]:
    """One row per slice with a finding in the model's answer."""
    return [{"series": n, "slice": k, "modality": r.modality, "wrong": s.findings != s.reference,
             "reliability": s.reliability, "entropy": s.entropy, "stability": s.stability}
            for n, r in enumerate(records) for k, s in enumerate(r.slices) if s.findings]


def lesion_rows(records: list[SeriesRecord]) -> list[dict]:
    return [{"series": n, "modality": r.modality, **dataclasses.asdict(lesion)}
            for n, r in enumerate(records) for lesion in r.reported]


def signal_table(rows: list[dict], wrong_key: str, signals: dict[str, str]) -> dict[str, float | None]:
    """AUROC of each signal (``-name``: lower means more doubt) for ``wrong_key``."""
    out = {}
    for name, key in signals.items():
        usable = [r for r in rows if r[key] is not None and not math.isnan(r[key])]
        sign = -1.0 if name.startswith("-") else 1.0
        out[name] = auroc([r[wrong_key] for r in usable], [sign * r[key] for r in usable])
    return out


def slice_uncertainty(row: dict, weight: float) -> float:
    """A slice row's uncertainty under a policy with ``weight`` (inference.reliability.uncertainty)."""
    return with_decoder_doubt(row["entropy"] or 0.0, row["stability"], weight)


def choose_cuts(uncertainties: list[float], wrong: list[bool], high_error: float = 0.1,
                low_error: float = 0.5) -> tuple[float, float]:
    """Cuts (high_below, low_above) that make the levels mean what they say: "high" as wide as it can be with at
    most ``high_error`` of its items wrong, "low" as wide as it can be with at least ``low_error`` of them wrong
    (and never reaching into "high"); each cut halfway between two observed values."""
    values = np.array(uncertainties, dtype=float)
    bad = np.array(wrong, dtype=bool)
    distinct = np.unique(values)
    between = np.concatenate([[distinct[0] - 1e-6], (distinct[:-1] + distinct[1:]) / 2, [distinct[-1] + 1e-6]])
    high = max((c for c in between if (values < c).any() and bad[values < c].mean() <= high_error),
               default=float(between[0]))
    low = min((c for c in between if c >= high and (values > c).any() and bad[values > c].mean() >= low_error),
              default=float(between[-1]))
    high = max(float(high), 0.0)  # an uncertainty is never negative
    return round(high, 4), round(max(float(low), high), 4)


def lesion_row_uncertainty(lesion: dict, slices: list[dict], weight: float, rule: str = "worst") -> float:
    """A reported lesion's uncertainty from its slices' under a lesion rule (inference.reliability.lesion_uncertainty)."""
    first, last = lesion["slice_range"]
    return lesion_uncertainty([slice_uncertainty(r, weight) for r in slices
                               if r["series"] == lesion["series"] and first <= r["slice"] <= last], rule)


def levels(values: list[float], wrong: list[bool], cuts: tuple[float, float]) -> dict[str, list[float]]:
    """Per level: [items, fraction wrong] (the card's calibration tables, for a policy not yet written)."""
    high_below, low_above = cuts
    policy = ReliabilityPolicy(high_below=high_below, low_above=low_above)
    out: dict[str, list[float]] = {}
    for value, bad in zip(values, wrong):
        out.setdefault(level(value, policy).value, []).append(bad)
    return {name: [len(v), round(sum(v) / len(v), 3)] for name, v in sorted(out.items())}


def report(slices: list[dict], lesions: list[dict], weights: list[float], cuts: tuple[float, float] | None) -> None:
    by_modality = {m: ([r for r in slices if r["modality"] == m], [r for r in lesions if r["modality"] == m])
                   for m in sorted({r["modality"] for r in slices} | {r["modality"] for r in lesions})}
    for modality, (of_slices, of_lesions) in by_modality.items():
        print(modality, "slices with a finding:", len(of_slices), "wrong:", sum(r["wrong"] for r in of_slices),
              "AUROC", json.dumps(signal_table(of_slices, "wrong", {"entropy": "entropy", "-stability": "stability"})))
        print(modality, "reported lesions:", len(of_lesions), "false:", sum(r["false_positive"] for r in of_lesions),
              "AUROC", json.dumps(signal_table(of_lesions, "false_positive", {"-stability": "stability", "-mean_score": "mean_score",
                                                                              "-slices": "slices", "-volume_ml": "volume_ml"})))
    for weight in weights:  # one policy for the card: cuts chosen on every modality's slices together
        chosen = cuts or choose_cuts([slice_uncertainty(r, weight) for r in slices], [r["wrong"] for r in slices])
        print(f"stability weight {weight}: cuts {chosen}{' (given)' if cuts else ' (chosen here)'}")
        for modality, (of_slices, of_lesions) in by_modality.items():
            print(f"  {modality} slices", json.dumps(levels([slice_uncertainty(r, weight) for r in of_slices],
                                                           [r["wrong"] for r in of_slices], chosen)),
                  *(f"lesions ({rule})" + json.dumps(levels([lesion_row_uncertainty(r, slices, weight, rule) for r in of_lesions],
                                                           [r["false_positive"] for r in of_lesions], chosen))
                    for rule in LESION_RULES))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_subject_arguments(parser, seed=1)
    parser.add_argument("--held-out", action="store_true", help="only the card's held-out split of these subjects")
    parser.add_argument("--json", type=Path, help="write every slice's and lesion's signals here")
    parser.add_argument("--from-json", type=Path, help="analyse a study written before, without evaluating again")
    parser.add_argument("--weight", type=float, action="append", help="stability weights to try (default: 0, 0.5, 1)")
    parser.add_argument("--cuts", type=reliability_cuts_argument, metavar="HIGH,LOW",
                        help="score these cuts (e.g. chosen on seed 1) instead of choosing them here")
    args = parser.parse_args()
    if args.from_json:
        study = json.loads(args.from_json.read_text())
        report(study["slices"], study["lesions"], args.weight or [0.0, 0.5, 1.0], args.cuts)
        return
    items, model, cache = subjects(args, args.held_out)
    cached = CachedEncoderModel(model, cache)
    records: list[SeriesRecord] = []
    for n, item in enumerate(items, start=1):
        records.append(evaluate_series(item, cached))
        print(f"series {n}/{len(items)} ({item.modality}): {records[-1].detected}/{records[-1].true_lesions} found, "
              f"{records[-1].false_positives} false", flush=True)
        if args.json:  # after every series: a study stopped part-way keeps what it measured
            args.json.write_text(json.dumps({"model": model.version, "seed": args.seed, "series": n,
                                             "slices": slice_rows(records), "lesions": lesion_rows(records)}))
    report(slice_rows(records), lesion_rows(records), args.weight or [0.0, 0.5, 1.0], args.cuts)


if __name__ == "__main__":
    main()
