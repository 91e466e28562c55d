"""Comparing a retrained checkpoint with the one it should reproduce: figures counted in lesions, weights."""

import argparse
import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from benchmarks.compare_models import NOISE, compare_cards, compare_weights, outside_noise
from benchmarks.subjects import _counts, subject_names, trained_subjects
from inference.model.card import ModelCard
from training.sources import LabeledSeries, SyntheticSpec, split_by_subject, synthetic, synthetic_subject


def _card(found: int, false_positives: int) -> ModelCard:
    figures = {"lesion_sensitivity": found / 24, "false_positives_per_volume": false_positives / 20,
               "true_lesions": 24, "volumes": 20, "mean_dice_detected_lesions": 0.9}
    return ModelCard(name="m", version="1", architecture={}, modalities=("CT",),
                     metrics={"CT": figures, "all": figures, "training": {"final_loss": 0.2}})


def test_rates_are_counted_back_into_lesions_and_false_positives():
    rows = {row.figure: row for row in compare_cards(_card(21, 15), _card(22, 12))}
    assert rows["lesion_sensitivity"].counted == "+1 lesions"
    assert rows["false_positives_per_volume"].counted == "-3 false positives"
    assert rows["mean_dice_detected_lesions"].counted == ""  # not a rate over lesions
    assert rows["slice_dice"].first is None and rows["slice_dice"].counted == ""  # absent from both cards
    other_split = _card(22, 12)
    other_split.metrics["CT"]["true_lesions"] = 30
    assert next(row for row in compare_cards(_card(21, 15), other_split)
                if row.figure == "lesion_sensitivity").counted == ""  # another split: no count of lesions
    assert {row.modality for row in compare_cards(_card(21, 15), _card(22, 12))} == {"CT"}  # not "all", "training"


def _scored(found: int, false_positives: int, dice: float = 0.9, accuracy: float = 0.95) -> ModelCard:
    card = _card(found, false_positives)
    card.metrics["CT"] |= {"mean_dice_detected_lesions": dice, "finding_accuracy": accuracy}
    return card


def test_the_verdict_is_within_noise_only_where_every_headline_figure_is():
    shipped = _scored(22, 4)
    assert outside_noise(shipped, _scored(20, 6, 0.876, 0.916)) == []  # 2 lesions, 2 false positives, 0.024, 0.034
    assert outside_noise(shipped, _scored(19, 4)) == ["CT lesion_sensitivity: 0.9167 -> 0.7917 (-3 lesions, noise 2 lesions)"]
    assert outside_noise(shipped, _scored(22, 7))[0].startswith("CT false_positives_per_volume: 0.2 -> 0.35 (+3 false")
    assert [p.split(":")[0] for p in outside_noise(shipped, _scored(22, 4, 0.87, 0.90))] == [
        "CT mean_dice_detected_lesions", "CT finding_accuracy"]
    unscored = _scored(22, 4)
    del unscored.metrics["CT"]["finding_accuracy"]
    assert outside_noise(shipped, unscored) == ["CT finding_accuracy: missing from the second card"]
    other_split = _scored(22, 4)
    other_split.metrics["CT"]["volumes"] = 40
    assert outside_noise(shipped, other_split) == ["CT false_positives_per_volume: scored over 20 and 40 volumes"]
    nothing = _scored(22, 4)
    nothing.metrics.pop("CT")
    assert len(outside_noise(shipped, nothing)) == len(NOISE)  # a card never scored reproduces nothing


def test_the_command_compares_every_members_weights_and_fails_outside_noise(tmp_path, monkeypatch, capsys):
    from benchmarks import compare_models
    from inference.model.card import CARD_FILE, EnsembleMember

    weights = {"a": torch.ones(3)}
    for name, found, member_scale in (("shipped", 22, 1.0), ("close", 21, 1.0), ("far", 18, 2.0)):
        folder = tmp_path / name
        folder.mkdir()
        card = _scored(found, 4)
        card = dataclasses.replace(card, members=(EnsembleMember("member-1.safetensors", "0" * 64, ("CT",), "r2"),))
        (folder / CARD_FILE).write_text(card.to_json())
        save_file(weights, str(folder / "model.safetensors"))
        save_file({"a": weights["a"] * member_scale}, str(folder / "member-1.safetensors"))
    monkeypatch.setattr("sys.argv", ["compare_models", str(tmp_path / "shipped"), str(tmp_path / "close")])
    assert compare_models.main() == 0
    assert "within the noise of one training run" in (out := capsys.readouterr().out)
    assert "weights member-1.safetensors: 1 of 1 tensors bit-equal" in out
    monkeypatch.setattr("sys.argv", ["compare_models", str(tmp_path / "shipped"), str(tmp_path / "far")])
    assert compare_models.main() == 1
    out = capsys.readouterr().out
    assert "NOT within the noise" in out and "-4 lesions" in out
    assert "weights member-1.safetensors: 0 of 1 tensors bit-equal; largest relative difference 1 (a)" in out


def test_weights_equal_and_apart(tmp_path):
    weights = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4)}
    save_file(weights, str(tmp_path / "first.safetensors"))
    save_file({"a": weights["a"], "b": weights["b"] * 1.01}, str(tmp_path / "second.safetensors"))
    difference = compare_weights(tmp_path / "first.safetensors", tmp_path / "second.safetensors")
    assert (difference.tensors, difference.bit_equal, difference.largest_relative_name) == (2, 1, "b")
    assert difference.largest_relative == pytest.approx(0.01, rel=1e-3)
    save_file({"a": torch.zeros(3, 2), "b": weights["b"]}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not the same architecture"):
        compare_weights(tmp_path / "first.safetensors", tmp_path / "other.safetensors")


def _subjects(mr: int, ct: int) -> list[LabeledSeries]:
    return [LabeledSeries(synthetic_subject(modality, i), modality, [Path(f"{modality}{i}")], Path("seg"))
            for modality, count in (("MR", mr), ("CT", ct)) for i in range(count)]


def test_models_trained_on_other_counts_are_compared_on_subjects_neither_trained_on():
    trained_on_80 = {item.subject for item in split_by_subject(_subjects(80, 80))[0]}
    assert trained_subjects(80, 80) == trained_on_80  # what `train` on 80 + 80 subjects trains on
    held_out_of_160 = {item.subject for item in split_by_subject(_subjects(160, 0))[1]}
    kept = subject_names(160, 0, held_out=True, unseen_by=[(80, 80)])
    assert kept == held_out_of_160 - trained_on_80
    assert 0 < len(kept) < len(held_out_of_160)  # the two splits hold out different subjects
    assert subject_names(160, 0, True, [(160, 0)]) == held_out_of_160  # the larger run's own held-out split
    assert subject_names(160, 0, True, [(160, 0), (80, 80)]) == kept
    assert subject_names(3, 2) == {item.subject for item in _subjects(3, 2)}  # not held out: all of them
    assert _counts("160,0") == (160, 0)
    for wrong in ("80", "80,x", "-1,80"):
        with pytest.raises(argparse.ArgumentTypeError):
            _counts(wrong)


def test_only_the_subjects_scored_are_written(tmp_path):
    """A held-out split of 240 subjects writes its 60, not 240: one CT phantom here, of three asked for."""
    items = synthetic(tmp_path, SyntheticSpec(0, 3, 7), only={"SYN-CT-0002", "SYN-MR-0000"})
    assert [item.subject for item in items] == ["SYN-CT-0002"]  # an MR subject outside the spec is not made
    assert sorted(path.name for path in (tmp_path / "seed-7").iterdir()) == ["SYN-CT-0002"]
