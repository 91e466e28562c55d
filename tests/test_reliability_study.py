"""Choosing a reliability policy from measured signals: how well a signal ranks the wrong findings first, and
cuts that make "high" and "low" mean what they say."""

import math

import pytest

from benchmarks.reliability_study import auroc, choose_cuts, lesion_row_uncertainty, slice_uncertainty


def test_auroc_is_the_chance_that_a_wrong_finding_has_more_doubt_than_a_right_one():
    assert auroc([True, False, False], [0.9, 0.1, 0.2]) == 1.0
    assert auroc([True, False], [0.1, 0.9]) == 0.0
    assert auroc([True, False], [0.5, 0.5]) == 0.5  # a tie counts half
    assert auroc([True, True], [0.1, 0.2]) is None  # nothing right to rank against


def test_cuts_keep_high_nearly_always_right_and_low_mostly_wrong():
    doubt = [0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 0.9]
    wrong = [False, False, False, True, False, False, True, True, True]
    high, low = choose_cuts(doubt, wrong, high_error=0.1, low_error=0.75)
    assert high == pytest.approx(0.15)  # one more item and "high" would be a quarter wrong
    assert low == pytest.approx(0.35)  # above it three of four are wrong; "medium" between holds one wrong of two
    assert choose_cuts([0.1, 0.2], [False, False]) == (0.2, 0.2)  # nothing wrong: all "high"


def test_a_slices_uncertainty_is_its_entropy_plus_the_weighed_doubt_of_its_mask():
    row = {"entropy": 0.2, "stability": 0.6}
    assert slice_uncertainty(row, 0.5) == pytest.approx(0.4)
    assert slice_uncertainty({"entropy": None, "stability": None}, 1.0) == 0.0  # nothing sampled, no mask


def test_a_reported_lesion_is_rated_from_its_own_series_slices_by_the_rule():
    """Only the slices of the lesion's series inside its range count: a neighbouring series' doubtful slice,
    or one past the lesion's end, does not."""
    slices = [{"series": 0, "slice": k, "entropy": 0.0, "stability": s} for k, s in ((3, 0.2), (4, 0.9), (5, 0.95), (6, 0.1))] \
        + [{"series": 1, "slice": 4, "entropy": 0.0, "stability": 0.0}]
    lesion = {"series": 0, "slice_range": [3, 5]}
    assert lesion_row_uncertainty(lesion, slices, 1.0, "worst") == pytest.approx(0.8)
    assert lesion_row_uncertainty(lesion, slices, 1.0, "median") == pytest.approx(0.1)
    assert math.isnan(lesion_row_uncertainty({"series": 2, "slice_range": [0, 9]}, slices, 1.0))  # no slice of its own
