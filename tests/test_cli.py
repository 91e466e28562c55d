"""The `dicom-node` command as an administrator uses it."""

import subprocess
import sys

import pytest

from dicom_node.cli import main
from tests.conftest import TEST_PEERS
from tests.localpeers import write_node_config
from tests.dcmtk import storescu_verbose


def test_config_check_prints_the_settings(tmp_path, capsys):
    config = write_node_config(tmp_path, 11112, TEST_PEERS)
    assert main(["config", "check", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "DICOM_NODE on 127.0.0.1:11112" in out and "peer       ECHOONLY at any host:104 may echo" in out


def test_config_check_names_the_bad_key(tmp_path, capsys):
    config = write_node_config(tmp_path, 11112, [{"ae_title": "PACS", "port": 99999}])
    assert main(["config", "check", "--config", str(config)]) == 2
    assert "config: peers[0].port: 99999 must be a TCP port" in capsys.readouterr().err


def test_status_counts_what_was_stored(running_node, ct_series, capsys):
    assert len(storescu_verbose(running_node.port, ct_series[:5]).succeeded()) == 5
    assert main(["status", "--config", str(running_node.config.source)]) == 0
    out = capsys.readouterr().out
    assert "patients   1" in out and "studies    1" in out and "series     1" in out and "instances  5" in out
    assert "2.5 MiB" in out


def test_echo_reaches_a_configured_peer(running_node, tmp_path, capsys):
    """The node echoes itself: a peer entry pointing at the running node's port."""
    config = write_node_config(tmp_path / "client", 11112, [{"ae_title": "DICOM_NODE", "host": "127.0.0.1", "port": running_node.port}],
                               ae_title="ECHOSCU")
    assert main(["echo", "DICOM_NODE", "--config", str(config)]) == 0
    assert "status 0x0000" in capsys.readouterr().out
    assert main(["echo", "NOBODY", "--config", str(config)]) == 2


def test_echo_to_a_peer_that_is_down(tmp_path, capsys):
    from tests.localpeers import free_port

    config = write_node_config(tmp_path, 11112, [{"ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}])
    assert main(["echo", "PACS", "--config", str(config)]) == 1
    assert "C-ECHO failed: PACS at 127.0.0.1" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["serve"], ["echo"], ["status"], ["resend"], ["retry"], ["analyze"], ["train"],
                                     ["model", "list"], ["model", "activate"], ["model", "combine"], ["model", "point"],
                                     ["config", "check"]])
def test_every_command_has_help(command):
    result = subprocess.run([sys.executable, "-m", "dicom_node.cli", *command, "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "usage: dicom-node" in result.stdout and "--config" in result.stdout


def test_options_work_before_and_after_the_command(tmp_path, capsys):
    config = write_node_config(tmp_path, 11112, TEST_PEERS)
    assert main(["--config", str(config), "config", "check"]) == 0
    assert str(config) in capsys.readouterr().out
    assert main(["config", "check", "--config", str(config)]) == 0


@pytest.mark.parametrize("text,value", [("2", 2), ("CT=2,MR=3", {"CT": 2, "MR": 3}), ("mr=4", {"MR": 4})])
def test_the_operating_point_is_given_for_all_modalities_or_per_modality(text, value):
    from dicom_node.cli_types import lesion_slices_argument

    assert lesion_slices_argument(text) == value


@pytest.mark.parametrize("text,value", [("0.9", 0.9), ("CT=0.9", {"CT": 0.9}), ("ct=1,MR=0.5", {"CT": 1.0, "MR": 0.5})])
def test_the_aligned_overlap_is_given_for_all_modalities_or_per_modality(text, value):
    from dicom_node.cli_types import aligned_overlap_argument

    assert aligned_overlap_argument(text) == value


@pytest.mark.parametrize("text", ["0", "1.5", "CT=-0.1", "CT", "CT=high", "CT=0.9,MR"])
def test_an_aligned_overlap_outside_0_to_1_or_malformed_is_a_usage_error(text, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--synthetic", "--aligned-overlap", text, "--out", str(tmp_path / "model")])
    assert exit_.value.code == 2
    assert "--aligned-overlap" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()


def test_presence_is_off_unless_asked_for_and_a_threshold_must_be_a_probability(capsys):
    from dicom_node.cli_types import presence_argument
    from dicom_node.train_command import TrainingArgumentError, training_architecture
    from inference.model.grounded import GroundedConfig

    assert GroundedConfig(**training_architecture(None)).presence is False
    on = GroundedConfig(**training_architecture(presence_argument("0.3")))
    assert on.presence and on.presence_threshold == 0.3 and not on.mirror
    assert GroundedConfig(**training_architecture(None, mirror=True)).mirror
    assert GroundedConfig(**training_architecture(None, min_mask_pixels=30)).min_mask_pixels == 30  # 1.3.0's card
    with pytest.raises(TrainingArgumentError, match="min_mask_pixels must be at least 1"):
        training_architecture(None, min_mask_pixels=0)
    for bad in ("1", "-0.1", "high"):
        with pytest.raises(SystemExit) as stopped:
            main(["train", "--presence", bad, "--help"])
        assert stopped.value.code == 2 and "at least 0 and below 1" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["0", "CT", "CT=two", "CT=2,MR=0"])
def test_a_bad_operating_point_stops_the_command_with_the_expected_form(bad, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["train", "--min-lesion-slices", bad, "--help"])
    assert stopped.value.code == 2 and "CT=2,MR=3" in capsys.readouterr().err


@pytest.mark.parametrize("option,bad,message", [("--hard-negative-steps", "-1", "at least 0"), ("--steps", "0", "at least 1"),
                                                ("--hard-negative-steps", "many", "whole number"),
                                                ("--hard-negative-cycles", "0", "at least 1")])
def test_a_step_count_must_be_a_whole_number_in_range(option, bad, message, capsys):
    """Refused as a usage error before anything is trained, not as a traceback from the trainer's config."""
    with pytest.raises(SystemExit) as stopped:
        main(["train", option, bad, "--help"])
    assert stopped.value.code == 2 and message in capsys.readouterr().err


def test_the_cards_synthetic_data_names_only_the_kinds_trained_on():
    from dicom_node.train_command import synthetic_description
    from training.sources import SyntheticSpec

    mr_only = synthetic_description(SyntheticSpec(160, 0, 0))
    assert "160 head MRIs" in mr_only and "CT" not in mr_only and "lung" not in mr_only
    both = synthetic_description(SyntheticSpec(80, 40, 0))
    assert "80 head MRIs" in both and "40 CT phantoms" in both


@pytest.mark.parametrize("argv, recorded", [
    (["train", "--folder", "/exports/DOE^JANE 0417", "--steps", "2"], "dicom-node train --folder FOLDER1 --steps 2"),
    (["train", "--folder=/exports/PID-0417", "--fold", "/exports/PID-0418", "--fo=x"],
     "dicom-node train --folder=FOLDER1 --fold FOLDER2 --fo=FOLDER3"),
    (["train", "--folder", "", "--steps", "2"], "dicom-node train --folder FOLDER1 --steps 2"),  # "" is a folder too
    (["train", "--from-store", "--feature-dropout", "0.2", "--label", "liver tumour"],
     "dicom-node train --from-store --feature-dropout 0.2 --label 'liver tumour'"),
])
def test_the_cards_command_names_no_folder(argv, recorded):
    """Exports are often foldered by patient, and a card travels with its model: the command it records (to
    reproduce the run) keeps every option but the folders' paths."""
    from dicom_node.train_command import card_command

    assert card_command(argv) == recorded


@pytest.mark.parametrize("bad", ["../elsewhere", "a/b", "active", "shipped", ".hidden", "", "x" * 65])
def test_a_version_name_cannot_leave_the_models_folder_or_mean_another_model(bad, capsys):
    """The version becomes <storage>/models/<version> and a name in `model list`: a path in it would write the
    checkpoint elsewhere, and "active" or "shipped" could never be activated by that name."""
    with pytest.raises(SystemExit) as stopped:
        main(["train", "--version", bad, "--help"])
    assert stopped.value.code == 2 and "is not a version name" in capsys.readouterr().err


@pytest.mark.parametrize("options,message", [
    (["--hard-negative-steps", "300", "--hard-negative-cycles", "7"], "must be a multiple of hard_negative_cycles (7)"),
    (["--lesion-weight", "0"], "lesion_weight must be positive"),
    (["--learning-rate", "0"], "learning_rate must be positive"),
    (["--start-from", "no-such-model"], "--start-from: no model no-such-model"),
    (["--start-from", "shipped", "--detail", "8"], "--detail would change the shape"),
    (["--start-from", "shipped", "--encoder-precision", "bf16"], "trained on a fp32 encoder")])
def test_a_meaningless_training_setting_is_refused_before_training(options, message, tmp_path, capsys):
    """Named in the error, with nothing written: no training data folder, no checkpoint folder."""
    config = write_node_config(tmp_path, 11112, TEST_PEERS)
    code = main(["train", "--config", str(config), *options, "--out", str(tmp_path / "model"), "--data", str(tmp_path / "training")])
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "model").exists() and not (tmp_path / "training").exists()
