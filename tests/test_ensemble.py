"""Ensemble checkpoints: several trained runs' heads on one frozen encoder, their [SEG] answers averaged."""

import json

import numpy as np
import pytest
import torch

from inference.model.builtin import BuiltinModel, average_logits
from inference.model.card import ModelCard
from inference.model.grounded import GroundedSegmenter
from inference.model.litemedsam import WeightsError
from inference.model.protocol import question_modality, recognition_question
from training.ensemble import EnsembleError, combine

from tests.conftest import QUESTION, decoder_checkpoint


@pytest.fixture(scope="module")
def runs(trained, tmp_path_factory):  # type: ignore[no-untyped-def]
    """Two runs of one architecture: the taught toy, and heads that learnt nothing, which answer only MR."""
    folder = tmp_path_factory.mktemp("runs")
    taught = decoder_checkpoint(trained[0], folder / "taught")
    with torch.random.fork_rng():
        torch.manual_seed(1)
        other = BuiltinModel.new(ModelCard.from_json((taught / "model_card.json").read_text()))
    return taught, decoder_checkpoint(other, folder / "other", version="0.0.2-other", modalities=["MR"])


def _first_logits(model: BuiltinModel, embeddings: torch.Tensor, question: str) -> torch.Tensor:
    network = model.network
    with torch.no_grad():
        return network.decode_masks(embeddings, network.query_states(embeddings, question))[0]


def test_an_ensemble_averages_the_mask_probabilities_of_its_members(trained, runs, tmp_path):
    """The slice is a finding where the members' mean probability draws enough pixels, and the first mask drawn
    is that average; a member is asked only about its own modalities, so a CT question is answered as the
    first run alone answers it."""
    taught, other = runs
    images = trained[1]
    card = combine([taught, other], tmp_path / "ensemble", "0.1.0-ensemble")
    assert [(m.version, m.modalities) for m in card.members] == [("0.0.2-other", ("MR",))] and set(card.metrics) == {"training"}
    assert [r["version"] for r in card.metrics["training"]["ensemble_of"]] == ["0.0.1-test", "0.0.2-other"]
    ensemble, alone, member = (BuiltinModel.load(f) for f in (tmp_path / "ensemble", taught, other))
    assert len(ensemble.members) == 1

    on_ct, alone_ct = ensemble.interpret(images, QUESTION), alone.interpret(images, QUESTION)
    assert [r.answer.text for r in on_ct] == [r.answer.text for r in alone_ct]
    assert all((a.answer.masks == b.answer.masks).all() for a, b in zip(on_ct, alone_ct))

    mr = recognition_question("MR")
    embeddings = alone.encode(images)
    a, b = _first_logits(alone, embeddings, mr), _first_logits(member, embeddings, mr)
    expected = ((torch.sigmoid(a) + torch.sigmoid(b)) / 2 > 0.5).numpy()
    assert (expected[0] != (a[0] > 0).numpy()).sum() > 0  # the untaught member does change the answer
    answers = [r.answer for r in ensemble.interpret(images, mr)]
    for k, answer in enumerate(answers):
        finding = expected[k].sum() >= 30
        assert (answer.text != "No findings.") == finding
        if finding:
            assert (answer.masks[0] == expected[k]).all()
            # ... and its stability score, on which reliability rests, is the average's too
            averaged = GroundedSegmenter.mask_stability(average_logits(a[k:k + 1], b[k:k + 1]), 0.0)
            assert answer.stability[0] == pytest.approx(float(averaged[0]), abs=1e-5)


def test_an_ensemble_checkpoint_survives_saving_and_refuses_tampered_members(runs, tmp_path):
    taught, other = runs
    combine([taught, other], tmp_path / "ensemble", "0.1.0-ensemble")
    saved = BuiltinModel.load(tmp_path / "ensemble").save(tmp_path / "copy")
    assert saved.members[0].weights == "member-1.safetensors" and (tmp_path / "copy" / "member-1.safetensors").is_file()
    assert len(BuiltinModel.load(tmp_path / "copy").members) == 1
    member = tmp_path / "ensemble" / "member-1.safetensors"
    data = bytearray(member.read_bytes())
    data[-1] ^= 0xFF
    member.write_bytes(bytes(data))
    with pytest.raises(WeightsError, match="member-1.safetensors does not match the SHA-256"):
        BuiltinModel.load(tmp_path / "ensemble")


def test_combining_refuses_what_cannot_be_averaged(trained, runs, tmp_path):
    taught, other = runs
    with pytest.raises(EnsembleError, match="at least two"):
        combine([taught], tmp_path / "one", "x")
    wider = decoder_checkpoint(trained[0], tmp_path / "wider")
    card = json.loads((wider / "model_card.json").read_text())
    card["architecture"]["layers"] += 1
    (wider / "model_card.json").write_text(json.dumps(card))
    with pytest.raises(EnsembleError, match="differs .* in architecture"):
        combine([taught, wider], tmp_path / "mixed", "x")
    language = tmp_path / "language"
    trained[0].save(language)  # decided by the language model: no mask answer to average
    with pytest.raises(EnsembleError, match='decision = "decoder"'):
        combine([language, taught], tmp_path / "lm", "x")
    combine([taught, other], tmp_path / "ensemble", "e")
    for out in (taught, tmp_path / "ensemble"):  # never over a run it reads, or another checkpoint
        with pytest.raises(EnsembleError, match="holds a checkpoint already"):
            combine([other, taught], out, "x")
    with pytest.raises(EnsembleError, match="ensemble already"):
        combine([tmp_path / "ensemble", taught], tmp_path / "nested", "x")
    for name in ("../model.safetensors", "model.safetensors", "member.pt"):  # never a path out of the folder
        raw = json.loads((tmp_path / "ensemble" / "model_card.json").read_text())
        raw["members"][0]["weights"] = name
        with pytest.raises(ValueError, match="file name"):
            ModelCard.from_json(json.dumps(raw))
    assert not (tmp_path / "one").exists() and not (tmp_path / "mixed").exists()


def test_runs_trained_at_other_operating_points_combine_at_the_first_runs(runs, tmp_path):
    """The shipped model's first run was trained at 30 px and its others at 10: `model combine` refused them, so
    its reproduction failed after hours of training. The ensemble answers at the first run's point."""
    taught, other = runs
    original = (other / "model_card.json").read_text()
    card, first = json.loads(original), json.loads((taught / "model_card.json").read_text())["architecture"]
    card["architecture"] |= {"min_mask_pixels": first["min_mask_pixels"] + 20, "mask_threshold": 0.3,
                             "presence_threshold": 0.7}
    (other / "model_card.json").write_text(json.dumps(card))
    try:
        ensemble = combine([taught, other], tmp_path / "ensemble", "e")
    finally:
        (other / "model_card.json").write_text(original)  # the module's fixture
    assert ensemble.architecture == first and len(ensemble.members) == 1
    assert BuiltinModel.load(tmp_path / "ensemble").card.architecture == first


def test_the_question_names_the_modality_that_picks_the_members():
    assert question_modality(recognition_question("MR")) == "MR" and question_modality(QUESTION) == "CT"
    assert question_modality("Please segment the liver in the CT image.") == "CT"
    assert question_modality("What is this?") is None


def test_model_combine_from_the_command_line(runs, tmp_path, capsys):
    from dicom_node.cli import main
    from tests.localpeers import write_node_config

    taught, other = runs
    config = write_node_config(tmp_path / "node", 11112, [])
    assert main(["model", "combine", "e-1", str(taught), str(other), "--config", str(config)]) == 0
    assert "has no held-out figures yet" in capsys.readouterr().out
    assert main(["model", "list", "--config", str(config)]) == 0
    assert "e-1" in (listing := capsys.readouterr().out) and "(CT, MR, an ensemble of 2 runs)" in listing
    assert main(["model", "combine", "e-2", str(taught), "no-such-model", "--config", str(config)]) == 2
    assert "model: no model no-such-model" in capsys.readouterr().err


def test_members_with_a_detail_branch_see_each_slice_between_its_neighbours(trained_detail, tmp_path):
    """Each member's own detail branch gets the slices with their neighbours, as the first run's does: a 2.5D
    run combined with a copy of itself answers as it does alone (a member decoding without its branch, or
    with another slice's, would move the average)."""
    model, images, _, _, _, stacks = trained_detail
    model.save(tmp_path / "a")
    model.save(tmp_path / "b")
    combine([tmp_path / "a", tmp_path / "b"], tmp_path / "ensemble", "e")
    ensemble, alone = BuiltinModel.load(tmp_path / "ensemble"), BuiltinModel.load(tmp_path / "a")
    assert len(ensemble.members) == 1
    both, single = ensemble.interpret(images, QUESTION, context=stacks), alone.interpret(images, QUESTION, context=stacks)
    assert [r.answer.text for r in both] == [r.answer.text for r in single]
    assert single[0].answer.masks.sum() > 0
    for a, b in zip(both, single):  # logit(sigmoid(x)) is x to rounding: a boundary pixel may flip
        assert a.answer.masks.shape == b.answer.masks.shape and (a.answer.masks != b.answer.masks).sum() <= 5
    with torch.no_grad():  # the check above can fail: the member's answer without its detail branch differs
        embeddings = alone.encode(images[:1])
        query = alone.network.query_states(embeddings, QUESTION)
        with_branch = alone.network.decode_masks(embeddings, query, alone.detail(stacks[:1]))[0]
        without = alone.network.decode_masks(embeddings, query, None)[0]
    assert ((with_branch > 0) != (without > 0)).sum() > 50
