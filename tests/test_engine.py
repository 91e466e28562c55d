"""The engine: a Volume in, 3D lesions out; masks land on the source pixels; scope is respected."""

import numpy as np
import pytest

from inference.engine import Assessment, EngineConfig, interpret_volume
from inference.model.card import ReliabilityPolicy
from inference.model.protocol import Answer, Interpretation, ModelScope
from inference.preprocess import Normalization
from inference.reliability import Reliability
from inference.slicing import SliceRef, Volume


class ThresholdModel:
    """A model double for the engine's geometry: the finding is whatever is brighter than 0.95.

    Its masks depend on the image only, like a real segmenter's, so where they land on the source grid tests
    the engine's mapping, not the model.
    """

    input_size = 64
    scope = ModelScope(("CT",))
    version = "threshold-1"
    normalization = Normalization()
    reliability = ReliabilityPolicy(samples=3)
    min_lesion_slices = 1

    def __init__(self):
        self.batches = []

    def interpret(self, images, question, samples=0, temperature=0.7, seed=0):
        self.batches.append(len(images))
        out = []
        for image in images:
            mask = image > 0.95
            if mask.any():
                a = Answer("It is [SEG]. Liver tumor.", mask[None], np.array([0.9], np.float32))
                out.append(Interpretation(a, (a,) * samples))
            else:
                out.append(Interpretation(Answer("No findings.", np.zeros((0, 64, 64), bool))))
        return out


def ct_volume(slices=12, rows=96, columns=128, spacing=(0.7, 0.9, 3.0)) -> Volume:
    voxels = np.full((slices, rows, columns), -1000.0, np.float32)  # air
    voxels[:, 10:90, 10:120] = 40.0  # body
    voxels[4:8, 30:54, 40:80] = 400.0  # lesion: bright in the soft-tissue window
    voxels[0] = -1000.0  # an empty slice above the body
    return Volume(voxels, np.array([-50.0, -40.0, 0.0]), spacing, np.eye(3), np.arange(slices) * spacing[2],
                  "1.2.3", "CT", "1.2.3.9", [SliceRef(f"1.2.3.9.{k}") for k in range(slices)])


def test_lesion_lands_on_the_source_pixels_with_measurements():
    volume = ct_volume()
    model = ThresholdModel()
    result = interpret_volume(volume, model, EngineConfig(batch_size=4))
    assert result.assessment is Assessment.ASSESSED and result.slices_skipped == 1
    assert max(model.batches) <= 4  # never more than batch_size slices in flight
    [lesion] = result.lesions
    truth = volume.voxels > 300
    iou = (lesion.mask & truth).sum() / (lesion.mask | truth).sum()
    assert iou > 0.85  # a 64-pixel model grid for a 128-pixel image: only the border pixels may differ
    assert lesion.slice_range == (4, 7) and lesion.label == "Liver tumor"
    assert lesion.volume_ml == pytest.approx(truth.sum() * 0.7 * 0.9 * 3.0 / 1000, rel=0.15)
    assert lesion.reliability is Reliability.HIGH
    assert [s.sop_instance_uid for s in lesion.sources] == [f"1.2.3.9.{k}" for k in range(4, 8)]


@pytest.mark.parametrize("operating_point,kept", [({"CT": 5, "MR": 2}, False), ({"CT": 4, "MR": 9}, True), (4, True), (5, False)])
def test_the_operating_point_of_the_series_modality_applies(operating_point, kept):
    """The lesion spans 4 slices: a model that requires 5 CT slices drops it, whatever it asks of MR."""
    model = ThresholdModel()
    model.min_lesion_slices = operating_point
    assert bool(interpret_volume(ct_volume(), model).lesions) is kept


@pytest.mark.parametrize("overlap,kept", [(None, False), ({"MR": 0.9}, False), ({"CT": 0.9}, True), (0.9, True)])
def test_a_short_aligned_lesion_is_kept_where_the_series_modality_allows_it(overlap, kept):
    """The lesion spans 4 slices, in the same place on each: 5 slices are required, but an aligned-overlap
    rule for CT (or for all modalities) keeps it."""
    model = ThresholdModel()
    model.min_lesion_slices, model.aligned_lesion_overlap = {"CT": 5}, overlap
    assert bool(interpret_volume(ct_volume(), model).lesions) is kept


def test_series_outside_scope_is_not_assessed_never_no_findings():
    volume = ct_volume()
    volume.modality = "MR"
    result = interpret_volume(volume, ThresholdModel())
    assert result.assessment is Assessment.NOT_ASSESSED and "outside the model's scope" in result.reason
    assert result.lesions == [] and not result.has_findings


def test_no_finding_series_is_assessed_with_no_lesions():
    volume = ct_volume()
    volume.voxels[volume.voxels > 300] = 40.0
    result = interpret_volume(volume, ThresholdModel())
    assert result.assessment is Assessment.ASSESSED and result.lesions == []


def test_trained_builtin_model_end_to_end(trained):
    """The real model (tiny, taught two slices) through the engine: text, masks, lesions, reliability."""
    model, images, _, targets, _ = trained
    window = model.normalization.ct_window
    hu = window[0] - window[1] / 2 + images * window[1]  # the HU that the CT window maps back to these images
    voxels = np.stack([hu[0], hu[0], hu[1]]).astype(np.float32)
    volume = Volume(voxels, np.zeros(3), (1.0, 1.0, 2.0), np.eye(3), np.array([0.0, 2.0, 4.0]), "1.2", "CT", "1.2.5",
                    [SliceRef(f"1.2.5.{k}") for k in range(3)])
    result = interpret_volume(volume, model, EngineConfig(batch_size=2))
    assert result.assessment is Assessment.ASSESSED
    by_label = {lesion.label: lesion for lesion in result.lesions}
    assert set(by_label) == {"Lung nodule", "Kidney tumor"}
    for index, label in enumerate(["Lung nodule", "Kidney tumor"]):
        lesion = by_label[label]
        assert lesion.slice_range == (0, 1)
        truth = targets[0][index]
        assert (lesion.mask[0] & truth).sum() / (lesion.mask[0] | truth).sum() > 0.8
        assert lesion.reliability in (Reliability.HIGH, Reliability.MEDIUM, Reliability.LOW)
        assert lesion.texts == ["It is [SEG]. Lung nodule. It is [SEG]. Kidney tumor."]


class NeighbourModel(ThresholdModel):
    """A 2.5D model double: records the neighbours the engine passes with each batch."""

    context_slices = 1

    def __init__(self):
        super().__init__()
        self.contexts = []

    def interpret(self, images, question, samples=0, temperature=0.7, seed=0, context=None):
        self.contexts.append(context)
        return super().interpret(images, question, samples, temperature, seed)


def test_a_2_5d_model_gets_each_slice_between_its_neighbours():
    """Slice k comes with k - 1 and k + 1 (the edge slice repeated past the ends), across batch boundaries, and
    a slice with no body (skipped itself) is still the neighbour of the first slice with body."""
    from inference.preprocess import SlicePreparer

    volume, model = ct_volume(), NeighbourModel()
    result = interpret_volume(volume, model, EngineConfig(batch_size=4))
    assert result.slices_interpreted == 11 and model.batches == [4, 4, 3]
    every = SlicePreparer(volume, 64, Normalization()).images(np.arange(12))
    contexts = np.concatenate(model.contexts)
    assert contexts.shape == (11, 3, 64, 64)
    for row, k in enumerate(range(1, 12)):
        np.testing.assert_array_equal(contexts[row], every[[k - 1, k, min(k + 1, 11)]])
    assert len(result.lesions) == 1  # the finding itself is unchanged
