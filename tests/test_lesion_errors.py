"""Where lesion figures are lost: a ring-enhancing lesion found only in its dark core must show as such."""

import math

import numpy as np

from inference.findings import SliceFinding, aggregate
from inference.reliability import Reliability
from inference.slicing import SliceRef, Volume
from training.evaluate import GroundTruth
from training.lesion_errors import lesion_errors


def _disc(radius: float, centre=(20, 20), shape=(40, 40)) -> np.ndarray:
    rows, columns = np.mgrid[:shape[0], :shape[1]]
    return (rows - centre[0]) ** 2 + (columns - centre[1]) ** 2 <= radius ** 2


def _case():
    """Tissue at 100; a lesion on slices 3-6: a bright rim (200) round a dark core (50); the model finds the
    core on slices 4-6 only, a spot elsewhere (false), and nothing of a second lesion on slice 8."""
    shape = (10, 40, 40)
    voxels = np.full(shape, 100.0, np.float32)
    lesion, core = np.zeros(shape, bool), np.zeros(shape, bool)
    for k in range(3, 7):
        lesion[k], core[k] = _disc(8), _disc(4)
    voxels[lesion] = 200.0
    voxels[core] = 50.0
    missed = np.zeros(shape, bool)
    missed[8] = _disc(3, centre=(5, 5))
    volume = Volume(voxels, np.zeros(3), (1.0, 1.0, 2.0), np.eye(3), np.arange(10) * 2.0, "1.2.3", "MR", "1.2.3.4",
                    [SliceRef(f"1.2.3.4.{k}") for k in range(10)])
    truth = GroundTruth({"Brain tumor": lesion | missed}, [lesion, missed], [])
    findings = [SliceFinding(k, "Brain tumor", core[k], 0.9, Reliability.HIGH) for k in (4, 5, 6)]
    findings += [SliceFinding(k, "Brain tumor", _disc(2, centre=(35, 35)), 0.9, Reliability.HIGH) for k in (1, 2)]
    return volume, truth, aggregate(volume, findings), core


def test_an_under_segmented_lesion_shows_what_was_missed():
    volume, truth, predicted, core = _case()
    (ring, missed), false = lesion_errors(volume, truth, predicted)
    found = int(core[4:7].sum())
    assert ring.label == "Brain tumor" and ring.slices == 4 and ring.found_slices == ring.drawn_slices == 3 and ring.detected
    assert math.isclose(ring.recall, found / truth.lesions[0].sum())
    assert ring.precision == 1.0  # the core lies wholly inside the lesion
    assert math.isclose(ring.dice, 2 * found / (truth.lesions[0].sum() + found))
    assert 100 < ring.missed_minus_found < 150  # the missed part is the bright rim (and slice 3's core)
    assert ring.volume_ml == round(truth.lesions[0].sum() * 2.0 / 1000, 3)
    assert not missed.detected and missed.dice == 0.0 and math.isnan(missed.precision)
    assert math.isnan(missed.missed_minus_found)  # nothing of it was found to compare with
    assert missed.contrast == 0.0  # it has the tissue's intensity: why it was missed
    assert [(f.slices, f.first_slice) for f in false] == [(2, 1)]


def test_a_prediction_on_a_speck_is_no_false_lesion():
    volume, truth, predicted, _ = _case()
    speck = np.zeros(volume.voxels.shape, bool)
    speck[1:3] = _disc(2, centre=(35, 35))
    _, false = lesion_errors(volume, GroundTruth(truth.labels, truth.lesions, [speck]), predicted)
    assert false == []


def test_a_lesion_drawn_on_too_few_slices_shows_as_drawn_but_not_found():
    """The slice rule, not the model, lost it: the listing must tell that from a lesion never drawn."""
    volume, truth, _, core = _case()
    findings = [SliceFinding(k, "Brain tumor", core[k], 0.9, Reliability.HIGH) for k in (4, 5, 6)]
    drawn = np.zeros(volume.voxels.shape, bool)
    for finding in findings:
        drawn[finding.slice_index] |= finding.mask
    predicted = aggregate(volume, findings, min_slices=4)  # a rule of 4 slices drops the 3-slice core
    (ring, missed), _ = lesion_errors(volume, truth, predicted, drawn)
    assert predicted == [] and not ring.detected and ring.dice == 0.0
    assert ring.found_slices == 0 and ring.drawn_slices == 3
    assert missed.drawn_slices == 0
