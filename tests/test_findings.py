"""Reliability from sampled answers, and 3D lesions measured in the volume's real geometry."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from inference.findings import SliceFinding, aggregate, aligned, largest_diameter_mm
from inference.model.card import ReliabilityPolicy
from inference.model.grounded import GroundedSegmenter
from inference.model.protocol import Answer, Interpretation
from inference.reliability import Reliability, capped, lesion_uncertainty, level, semantic_entropy, uncertainty
from inference.slicing import SliceRef, Volume


def answer(text: str, mask: np.ndarray | None = None) -> Answer:
    masks = np.zeros((0, 8, 8), bool) if mask is None else mask[None]
    return Answer(text, masks, np.ones(len(masks), np.float32))


def test_stability_is_how_much_of_a_mask_survives_a_stricter_threshold():
    """A decoder sure of every pixel gives 1; a mask whose pixels sit near the threshold (a faint edge slice, a
    hesitant finding) gives little; an empty mask 0."""
    sure = torch.full((1, 8, 8), -12.0)
    sure[0, 2:6, 2:6] = 12.0
    ramp = torch.linspace(-3.0, 3.0, 64).reshape(1, 8, 8)  # pixel logits spread evenly around the threshold
    stability = GroundedSegmenter.mask_stability(torch.cat([sure, ramp, torch.full((1, 8, 8), -12.0)]), 0.0)
    assert stability[0] == pytest.approx(1.0)
    loose, strict = int((ramp > -1).sum()), int((ramp > 1).sum())
    assert stability[1] == pytest.approx(strict / loose) and stability[1] < 0.6
    assert stability[2] == 0.0
    # The threshold is the card's: the same ramp, thresholded higher, keeps less of its mask.
    assert GroundedSegmenter.mask_stability(ramp, 1.0)[0] < stability[1]


def test_uncertainty_adds_the_decoders_doubt_to_the_samples_entropy_as_the_card_weighs_it():
    """Samples that agree (a decoder-decided model with one label always does) leave the decoder's doubt as the
    only sign of a hesitant finding; cards without a weight keep semantic entropy alone."""
    mask = square(0, 0)
    greedy = Answer("It is [SEG]. Brain tumor.", mask[None], np.ones(1, np.float32), np.array([0.4], np.float32))
    agreeing = Interpretation(greedy, (answer("It is [SEG]. Brain tumor.", mask),) * 5)
    assert uncertainty(agreeing, ReliabilityPolicy()) == pytest.approx(0.0)
    weighed = ReliabilityPolicy(high_below=0.2, low_above=0.5, stability_weight=0.5)
    assert uncertainty(agreeing, weighed) == pytest.approx(0.3)  # 0.5 * (1 - 0.4)
    assert level(uncertainty(agreeing, weighed), weighed) is Reliability.MEDIUM
    split = Interpretation(greedy, (answer("It is [SEG]. Brain tumor.", mask),) * 2 + (answer("No findings."),) * 2)
    assert uncertainty(split, weighed) == pytest.approx(math.log(2) + 0.3)
    assert level(uncertainty(split, weighed), weighed) is Reliability.LOW
    assert math.isnan(uncertainty(Interpretation(greedy), weighed))  # no samples: "unknown", as before


@pytest.mark.parametrize("settings", [{"high_below": 0.9, "low_above": 0.5}, {"stability_weight": -1.0},
                                      {"samples": -1}, {"temperature": 0.0}, {"lesion_rule": "mean"},
                                      {"short_lesion_cap": "unknown"}])
def test_a_card_with_an_impossible_reliability_policy_is_refused(settings):
    with pytest.raises(ValueError):
        ReliabilityPolicy(**settings)


def square(r0, c0, size=4):
    m = np.zeros((8, 8), bool)
    m[r0:r0 + size, c0:c0 + size] = True
    return m


def test_agreeing_samples_with_identical_masks_have_zero_entropy():
    samples = [answer("It is [SEG]. Liver tumor.", square(0, 0))] * 5
    assert semantic_entropy(samples) == pytest.approx(0.0)
    assert level(semantic_entropy(samples), ReliabilityPolicy()) is Reliability.HIGH


def test_between_group_term_is_the_entropy_of_meanings():
    samples = [answer("It is [SEG]. Liver tumor.", square(0, 0))] * 2 + [answer("It is [SEG]. liver tumor .", square(0, 0))] * 2 \
        + [answer("No findings.")] * 4
    assert semantic_entropy(samples) == pytest.approx(math.log(2))  # two meanings, half each; case does not split them
    assert level(semantic_entropy(samples), ReliabilityPolicy()) is Reliability.MEDIUM


def test_within_group_term_counts_mask_disagreement():
    samples = [answer("It is [SEG]. Liver tumor.", square(0, 0)), answer("It is [SEG]. Liver tumor.", square(4, 4))]
    assert semantic_entropy(samples) == pytest.approx(1.0)  # same meaning, masks that do not overlap at all
    assert level(1.0, ReliabilityPolicy()) is Reliability.LOW
    assert level(float("nan"), ReliabilityPolicy()) is Reliability.UNKNOWN


def volume(shape=(10, 40, 40), spacing=(0.5, 0.5, 2.0), positions=None) -> Volume:
    positions = np.arange(shape[0]) * spacing[2] if positions is None else np.asarray(positions, float)
    return Volume(np.zeros(shape, np.float32), np.zeros(3), spacing, np.eye(3), positions, "1.2.3", "CT", "1.2.3.4",
                  [SliceRef(f"1.2.3.4.{k}") for k in range(shape[0])])


def disc(shape, centre, radius_px):
    rows, columns = np.mgrid[:shape[0], :shape[1]]
    return (rows - centre[0]) ** 2 + (columns - centre[1]) ** 2 <= radius_px ** 2


def test_slices_join_into_one_lesion_with_real_measurements():
    v = volume()
    findings = [SliceFinding(k, "Liver tumor", disc((40, 40), (20, 20), 8), 0.9, Reliability.HIGH, text="t") for k in (3, 4, 5)]
    findings[1] = SliceFinding(4, "Liver tumor", disc((40, 40), (20, 20), 10), 0.7, Reliability.MEDIUM)
    [lesion] = aggregate(v, findings)
    pixels = sum(f.mask.sum() for f in findings)
    assert lesion.volume_ml == pytest.approx(pixels * 0.25 * 2.0 / 1000)
    assert lesion.largest_axial_diameter_mm == pytest.approx(21 * 0.5, abs=0.5)  # 21-pixel disc at 0.5 mm
    assert lesion.slice_range == (3, 5) and [s.sop_instance_uid for s in lesion.sources] == ["1.2.3.4.3", "1.2.3.4.4", "1.2.3.4.5"]
    assert lesion.reliability is Reliability.MEDIUM  # the worst of its slices
    assert lesion.mean_score == pytest.approx((0.9 + 0.7 + 0.9) / 3)


def test_the_cards_lesion_rule_keeps_a_true_lesions_doubtful_tips_from_marking_it_low():
    """A lesion whose core slices are sure and whose thin end slices are not: "worst" rates it by a tip, "median"
    by the core; a lesion doubtful throughout is "low" under both, and one with no rated slice "unknown"."""
    policy = ReliabilityPolicy(high_below=0.35, low_above=0.8, stability_weight=1.0)
    core_and_tips = [0.9, 0.1, 0.05, 0.2, 1.1]  # slices 2..6: tip, core, core, core, tip

    def findings(uncertainties, first=2):
        return [SliceFinding(first + k, "Brain tumor", disc((40, 40), (20, 20), 6), 0.9, level(u, policy), u)
                for k, u in enumerate(uncertainties)]

    v = volume()
    [worst] = aggregate(v, findings(core_and_tips), policy=dataclasses.replace(policy, lesion_rule="worst"))
    [median] = aggregate(v, findings(core_and_tips), policy=dataclasses.replace(policy, lesion_rule="median"))
    assert (worst.reliability, median.reliability) == (Reliability.LOW, Reliability.HIGH)
    [unsure] = aggregate(v, findings([0.9, 0.85, 1.2]), policy=dataclasses.replace(policy, lesion_rule="median"))
    assert unsure.reliability is Reliability.LOW
    [middling] = aggregate(v, findings([0.3, 0.5, 0.6, 0.9]), policy=dataclasses.replace(policy, lesion_rule="median"))
    assert middling.reliability is Reliability.MEDIUM  # median 0.55
    [unrated] = aggregate(v, findings([math.nan] * 3), policy=dataclasses.replace(policy, lesion_rule="median"))
    assert unrated.reliability is Reliability.UNKNOWN
    assert lesion_uncertainty([0.2, math.nan, 0.4], "worst") == pytest.approx(0.4)  # an unrated slice is skipped
    assert lesion_uncertainty([0.2, math.nan, 0.4, 0.9], "median") == pytest.approx(0.4)
    with pytest.raises(ValueError, match="lesion rule"):
        lesion_uncertainty([0.2], "mean")
    [default] = aggregate(v, findings(core_and_tips))  # no policy: the worst slice, as before cards had a rule
    assert default.reliability is Reliability.LOW


def test_separate_blobs_and_labels_make_separate_lesions_and_small_ones_are_dropped():
    v = volume()
    findings = [
        SliceFinding(2, "Liver tumor", disc((40, 40), (10, 10), 5), 0.9, Reliability.HIGH),
        SliceFinding(7, "Liver tumor", disc((40, 40), (10, 10), 5), 0.9, Reliability.HIGH),  # not adjacent: another lesion
        SliceFinding(2, "Kidney tumor", disc((40, 40), (30, 30), 5), 0.9, Reliability.HIGH),
        SliceFinding(5, "Liver tumor", disc((40, 40), (30, 5), 0), 0.9, Reliability.HIGH),  # one pixel: 0.0005 mL
    ]
    lesions = aggregate(v, findings, min_volume_ml=0.01)
    assert sorted(l.label for l in lesions) == ["Kidney tumor", "Liver tumor", "Liver tumor"]


def test_a_model_can_require_a_lesion_on_two_slices():
    v = volume()
    findings = [
        SliceFinding(2, "Liver tumor", disc((40, 40), (10, 10), 5), 0.9, Reliability.HIGH),
        SliceFinding(3, "Liver tumor", disc((40, 40), (10, 10), 4), 0.9, Reliability.HIGH),  # the same lesion, next slice
        SliceFinding(7, "Liver tumor", disc((40, 40), (30, 30), 8), 0.9, Reliability.HIGH),  # large, but one slice only
    ]
    assert len(aggregate(v, findings, min_volume_ml=0.0)) == 2
    [kept] = aggregate(v, findings, min_volume_ml=0.0, min_slices=2)
    assert kept.slice_range == (2, 3) and kept.slice_count == 2


def test_a_short_lesion_is_kept_only_where_its_slices_are_aligned():
    """A compact lesion on two thick slices lies in the same place on both; an organ tip or gas shifts."""
    v = volume()
    aligned_pair = [SliceFinding(k, "Kidney tumor", disc((40, 40), (10, 10), r), 0.9, Reliability.HIGH)
                    for k, r in ((2, 5), (3, 4))]  # the smaller disc lies wholly inside the larger
    shifted_pair = [SliceFinding(k, "Kidney tumor", disc((40, 40), (30, c), 4), 0.9, Reliability.HIGH)
                    for k, c in ((6, 26), (7, 31))]  # touching, but only partly on top of each other
    single = [SliceFinding(9, "Kidney tumor", disc((40, 40), (30, 10), 6), 0.9, Reliability.HIGH)]
    findings = aligned_pair + shifted_pair + single
    assert len(aggregate(v, findings, min_volume_ml=0.0, min_slices=3)) == 0
    [kept] = aggregate(v, findings, min_volume_ml=0.0, min_slices=3, aligned_overlap=0.9)
    assert kept.slice_range == (2, 3)
    loose = aggregate(v, findings, min_volume_ml=0.0, min_slices=3, aligned_overlap=0.1)
    assert sorted(l.slice_range for l in loose) == [(2, 3), (6, 7)]  # a single slice is never "aligned"


def test_a_short_lesion_kept_for_its_alignment_is_at_best_the_cards_cap():
    """The aligned exception keeps lesions the slice rule would drop, where false ones gather: the card may
    bound their level; a lesion long enough for the rule keeps its own, and a cap never raises a level."""
    v = volume()
    sure = [SliceFinding(k, "Kidney tumor", disc((40, 40), (10, 10), 5), 0.9, Reliability.HIGH, 0.1) for k in (2, 3)]
    unsure = [SliceFinding(k, "Kidney tumor", disc((40, 40), (30, 30), 5), 0.9, Reliability.LOW, 1.0) for k in (6, 7)]
    long = [SliceFinding(k, "Liver tumor", disc((40, 40), (10, 30), 5), 0.9, Reliability.HIGH, 0.1) for k in (2, 3, 4)]
    policy = ReliabilityPolicy(stability_weight=1.0, lesion_rule="median", short_lesion_cap="medium")
    lesions = aggregate(v, sure + unsure + long, min_volume_ml=0.0, min_slices=3, aligned_overlap=0.9, policy=policy)
    levels = {(l.label, l.slice_range): l.reliability for l in lesions}
    assert levels == {("Kidney tumor", (2, 3)): Reliability.MEDIUM, ("Kidney tumor", (6, 7)): Reliability.LOW,
                      ("Liver tumor", (2, 4)): Reliability.HIGH}
    uncapped = aggregate(v, sure, min_volume_ml=0.0, min_slices=3, aligned_overlap=0.9,
                         policy=dataclasses.replace(policy, short_lesion_cap="high"))
    assert [l.reliability for l in uncapped] == [Reliability.HIGH]
    assert capped(Reliability.UNKNOWN, "low") is Reliability.UNKNOWN  # nothing rated: no level to bound


def test_alignment_is_the_overlap_of_consecutive_slices_over_the_smaller_mask():
    stack = np.zeros((4, 20, 20), bool)
    stack[1, 2:12, 2:12] = True  # 100 pixels
    stack[2, 2:12, 7:17] = True  # 100 pixels, half on top of slice 1
    assert aligned(stack, 0.5) and not aligned(stack, 0.51)
    stack[3, 0:2, 0:2] = True  # a third slice touching nothing of slice 2
    assert not aligned(stack, 0.01)


def test_uneven_spacing_is_measured_from_true_positions():
    v = volume(shape=(3, 20, 20), positions=[0.0, 2.0, 6.0])  # a missing slice between 1 and 2
    mask = np.ones((20, 20), bool)
    [lesion] = aggregate(v, [SliceFinding(k, "Lesion", mask, 1.0, Reliability.HIGH) for k in range(3)])
    assert lesion.volume_ml == pytest.approx(sum(400 * 0.25 * t for t in [(2 + 2) / 2, (2 + 4) / 2, (4 + 2) / 2]) / 1000)


def test_diameter_uses_anisotropic_spacing():
    mask = np.zeros((10, 10), bool)
    mask[2, 1:9] = True  # 8 pixels along x
    assert largest_diameter_mm(mask, (0.5, 2.0)) == pytest.approx(7 * 0.5 + 0.5)
