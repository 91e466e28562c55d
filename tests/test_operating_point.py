"""Choosing the operating point on validation subjects: every point is scored from one loose pass."""

import numpy as np

from inference.findings import SliceFinding
from inference.reliability import Reliability
from inference.slicing import SliceRef, Volume
from training.evaluate import GroundTruth
from training.operating_point import SeriesPass, choose, score_point


def _pass() -> SeriesPass:
    """A CT series with one true lesion on slices 4-6 (found, large first masks) and a spot on slice 9 that
    is not a lesion (a small first mask, one slice)."""
    shape = (12, 64, 64)
    volume = Volume(np.zeros(shape, np.float32), np.zeros(3), (1.0, 1.0, 5.0), np.eye(3), np.arange(12) * 5.0,
                    "1.2.3", "CT", "1.2.3.9", [SliceRef(f"1.2.3.9.{k}") for k in range(12)])
    truth = np.zeros(shape, bool)
    truth[4:7, 20:30, 20:30] = True
    findings, first, presence = [], {}, {}
    for k in (4, 5, 6):
        mask = np.zeros(shape[1:], bool)
        mask[21:30, 20:30] = True
        findings.append(SliceFinding(k, "Liver tumor", mask, 0.9, Reliability.HIGH))
        first[k], presence[k] = 40, 0.9
    spot = np.zeros(shape[1:], bool)
    spot[50:54, 50:54] = True
    findings.append(SliceFinding(9, "Liver tumor", spot, 0.5, Reliability.HIGH))
    first[9], presence[9] = 8, 0.4
    return SeriesPass("CT", volume, GroundTruth({"Liver tumor": truth}, [truth], []), findings, first, 0.5, presence)


def test_each_point_filters_the_loose_pass_as_the_node_would():
    passes = [_pass()]
    loose = score_point(passes, "CT", 1, 1)
    assert loose.sensitivity == 1.0 and loose.false_positives_per_volume == 1.0
    assert loose.mean_dice_detected == 0.9474 and loose.finding_accuracy == round(11 / 12, 4)
    assert score_point(passes, "CT", 10, 1).false_positives_per_volume == 0.0  # the spot's mask is too small
    assert score_point(passes, "CT", 1, 2).false_positives_per_volume == 0.0  # the spot is on one slice
    doubtful = score_point(passes, "CT", 1, 1, presence_threshold=0.5)  # the spot's presence is 0.4
    assert (doubtful.sensitivity, doubtful.false_positives_per_volume) == (1.0, 0.0)
    assert score_point(passes, "CT", 1, 1, presence_threshold=0.95).sensitivity == 0.0
    strict = score_point(passes, "CT", 50, 1)
    assert strict.sensitivity == 0.0 and strict.finding_accuracy == 9 / 12  # the lesion's 3 slices missed


def test_a_point_can_keep_short_lesions_whose_slices_are_aligned():
    passes = [_pass()]
    assert score_point(passes, "CT", 1, 4).sensitivity == 0.0  # the lesion spans 3 slices
    kept = score_point(passes, "CT", 1, 4, aligned_overlap=0.9)  # its masks are the same on all 3
    assert (kept.sensitivity, kept.false_positives_per_volume, kept.aligned_overlap) == (1.0, 0.0, 0.9)
    scores = [score_point(passes, "CT", 1, 4, aligned_overlap=o) for o in (None, 0.5, 0.9)]
    assert choose(scores, max_false_positives=0.2).aligned_overlap == 0.5  # as sensitive: the loosest


def test_the_choice_is_the_most_sensitive_point_within_the_false_positive_budget():
    passes = [_pass()]
    scores = [score_point(passes, "CT", pixels, slices) for pixels in (1, 10, 50) for slices in (1, 2, 4)]
    best = choose(scores, max_false_positives=0.2)
    assert (best.min_mask_pixels, best.min_lesion_slices) == (10, 1)  # sensitive, no false positive, loosest
    assert choose(scores, max_false_positives=-1).false_positives_per_volume == 0.0  # none within: fewest


def test_among_equally_sensitive_points_the_one_with_fewer_false_positives_is_chosen():
    """The spot moved onto a slice of the lesion: keeping it changes no slice's answer, only adds a lesion."""
    series = _pass()
    spot = series.findings.pop()
    series.findings.append(SliceFinding(5, spot.label, spot.mask, spot.score, spot.reliability))
    loose, strict = score_point([series], "CT", 1, 1), score_point([series], "CT", 1, 2)
    assert (loose.sensitivity, loose.finding_accuracy) == (strict.sensitivity, strict.finding_accuracy)
    assert (loose.false_positives_per_volume, strict.false_positives_per_volume) == (1.0, 0.0)
    assert choose([loose, strict], max_false_positives=1.0) == strict


def test_the_loose_pass_draws_masks_at_the_threshold_it_scores_not_at_the_cards():
    """A card with a threshold per modality: each pass must still draw every modality's masks at the threshold
    being scored, and the card's point must be back afterwards."""
    import math

    from inference.model.builtin import BuiltinModel
    from inference.model.protocol import recognition_question
    from training.operating_point import _loosest

    from tests.conftest import tiny_card

    model = BuiltinModel.new(tiny_card(mask_threshold={"CT": 0.3}, min_lesion_slices={"CT": 3}), pretrained_sam=False)
    ct, mr = recognition_question("CT"), recognition_question("MR")
    assert math.isclose(model.mask_logit(ct), math.log(0.3 / 0.7)) and model.mask_logit(mr) == 0.0
    with _loosest(model, 0.6):
        assert math.isclose(model.mask_logit(ct), math.log(0.6 / 0.4)) and math.isclose(model.mask_logit(mr), math.log(0.6 / 0.4))
        assert model.min_lesion_slices == 1 and model.network.config.min_mask_pixels == 1
    assert math.isclose(model.mask_logit(ct), math.log(0.3 / 0.7)) and model.min_lesion_slices == {"CT": 3}
