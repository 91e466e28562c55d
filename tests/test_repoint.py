"""`dicom-node model point`: a trained model at another operating point, as a new version with the same weights."""

import pytest

from inference.model.builtin import BuiltinModel
from inference.model.card import ModelCard
from training.repoint import KEEP, PointChange, RepointError, repoint

from tests.conftest import QUESTION, decoder_checkpoint


@pytest.fixture(scope="module")
def source(trained, tmp_path_factory):  # type: ignore[no-untyped-def]
    """The taught toy as a decoder-decided checkpoint with held-out figures on its card."""
    metrics = {"CT": {"lesion_sensitivity": 1.0}, "training": {"steps": 7}}
    return decoder_checkpoint(trained[0], tmp_path_factory.mktemp("point") / "source", metrics=metrics)


def test_a_new_point_answers_with_the_same_weights_under_its_new_rule(trained, source, tmp_path, capsys):
    """The new version's card carries the point (CT masks at a looser threshold), its held-out figures are
    cleared (they were the old point's) and the weights are the same file; the source is untouched."""
    from dicom_node.cli import main
    from tests.localpeers import write_node_config

    images = trained[1]
    config = write_node_config(tmp_path / "node", 11112, [])
    out = tmp_path / "loose"
    assert main(["model", "point", "p-1", str(source), "--mask-threshold", "CT=0.0001",
                 "--min-lesion-slices", "CT=3,MR=2", "--aligned-overlap", "CT=0.75", "--out", str(out),
                 "--config", str(config)]) == 0
    assert "has no held-out figures yet" in capsys.readouterr().out
    card = ModelCard.from_json((out / "model_card.json").read_text())
    assert (card.version, card.mask_threshold, card.min_lesion_slices, card.aligned_lesion_overlap) == (
        "p-1", {"CT": 0.0001}, {"CT": 3, "MR": 2}, {"CT": 0.75})
    assert card.metrics == {"training": {"steps": 7, "operating_point_of": "0.0.1-test"}}
    assert (out / "model.safetensors").read_bytes() == (source / "model.safetensors").read_bytes()
    assert ModelCard.from_json((source / "model_card.json").read_text()).metrics["CT"] == {"lesion_sensitivity": 1.0}
    before = BuiltinModel.load(source).interpret(images, QUESTION)
    after = BuiltinModel.load(out).interpret(images, QUESTION)
    assert [r.answer.text for r in after] == [r.answer.text for r in before]
    assert (after[0].answer.masks >= before[0].answer.masks).all()
    assert after[0].answer.masks.sum() > before[0].answer.masks.sum()
    assert main(["model", "list", "--config", str(config)]) == 0
    assert "p-1" in capsys.readouterr().out

    again = tmp_path / "strict"  # "none" removes a rule; a second change starts from the first's card
    assert main(["model", "point", "p-2", "p-1", "--aligned-overlap", "none", "--min-mask-pixels", "40",
                 "--out", str(again), "--no-register", "--config", str(config)]) == 0
    card = ModelCard.from_json((again / "model_card.json").read_text())
    assert card.aligned_lesion_overlap is None and card.architecture["min_mask_pixels"] == 40
    assert card.mask_threshold == {"CT": 0.0001} and card.metrics["training"]["operating_point_of"] == "p-1"

    # The reliability policy's cuts and the decoder's weight in it: the rest of the policy kept
    rated = tmp_path / "rated"
    assert main(["model", "point", "p-5", "p-1", "--reliability-cuts", "0.2,0.45", "--stability-weight", "0.5",
                 "--lesion-rule", "median", "--short-lesion-cap", "medium",
                 "--out", str(rated), "--no-register", "--config", str(config)]) == 0
    policy = ModelCard.from_json((rated / "model_card.json").read_text()).reliability
    assert (policy.high_below, policy.low_above, policy.stability_weight, policy.lesion_rule, policy.short_lesion_cap) \
        == (0.2, 0.45, 0.5, "median", "medium")
    assert (policy.samples, policy.temperature) == (5, 0.7)


def test_a_point_that_cannot_be_written_is_refused(source, tmp_path, capsys):
    from dicom_node.cli import main
    from tests.localpeers import write_node_config

    with pytest.raises(RepointError, match="nothing would change"):
        repoint(source, tmp_path / "a", "a", PointChange())
    with pytest.raises(RepointError, match="new folder"):
        repoint(source, source, "a", PointChange(min_lesion_slices=3))
    with pytest.raises(ValueError, match="min_lesion_slices"):
        repoint(source, tmp_path / "b", "b", PointChange(min_lesion_slices={"CT": 0}))
    assert not (tmp_path / "b").exists()  # nothing half-written
    assert PointChange(aligned_lesion_overlap=None, mask_threshold=KEEP).changed() == {"aligned_lesion_overlap": None}

    config = write_node_config(tmp_path / "node", 11112, [])
    command = ["model", "point", "p-3", str(source), "--config", str(config), "--no-register"]
    assert main([*command, "--out", str(tmp_path / "c")]) == 2
    assert "nothing would change" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*command, "--mask-threshold", "MR=1.5"])
    assert "between 0 and 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*command, "--reliability-cuts", "0.5,0.2"])
    assert "HIGH <= LOW" in capsys.readouterr().err
    assert main([*command, "--stability-weight", "-1", "--out", str(tmp_path / "e")]) == 2
    assert "stability_weight cannot be negative" in capsys.readouterr().err and not (tmp_path / "e").exists()
    with pytest.raises(SystemExit):
        main([*command, "--lesion-rule", "mean"])
    assert "invalid choice" in capsys.readouterr().err

    tampered = tmp_path / "tampered"
    tampered.mkdir()
    for name in ("model.safetensors", "model_card.json"):
        (tampered / name).write_bytes((source / name).read_bytes())
    with (tampered / "model.safetensors").open("r+b") as fh:
        fh.seek(-4, 2)
        fh.write(b"\x00\x01\x02\x03")
    assert main(["model", "point", "p-4", str(tampered), "--min-lesion-slices", "3", "--out", str(tmp_path / "d"),
                 "--config", str(config), "--no-register"]) == 2
    assert "does not match the SHA-256" in capsys.readouterr().err and not (tmp_path / "d").exists()
