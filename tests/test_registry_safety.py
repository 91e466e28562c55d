"""The model registry as an administrator relies on it: a version name means one model for good, only a model
that loads becomes the active one, and fine-tuning checks its operating point as a fresh run does. Cheap: the
shipped weights at another point, tiny damaged folders, and training refused before it reads any data."""

import shutil
from pathlib import Path

import pytest

from dicom_node.cli import main
from dicom_node.config import load_config
from dicom_node.model_command import registered
from dicom_node.model_registry import SHIPPED_MODEL
from inference.model.card import CARD_FILE, WEIGHTS_FILE
from tests.localpeers import write_node_config


@pytest.fixture
def node(tmp_path: Path) -> Path:
    """A node's config with v1 (the shipped weights at another point, in tmp_path/v1) registered and active."""
    config = write_node_config(tmp_path / "node", 11112, [])
    assert main(["model", "point", "v1", "shipped", "--mask-threshold", "0.5", "--out", str(tmp_path / "v1"),
                 "--config", str(config)]) == 0
    assert main(["model", "activate", "v1", "--config", str(config)]) == 0
    return config


def active(config: Path, capsys: pytest.CaptureFixture) -> tuple[str, str]:
    """The version `model list` marks active, and the folder it lists for it."""
    capsys.readouterr()
    assert main(["model", "list", "--config", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    [index] = [i for i, line in enumerate(lines) if line.startswith("* ") and "= active" not in line]
    return lines[index].split()[1], lines[index + 1].strip()


def empty_exports(tmp_path: Path) -> Path:
    """A folder with no labelled series: a training run that got past its checks would stop at once."""
    folder = tmp_path / "exports"
    folder.mkdir(exist_ok=True)
    return folder


def test_registering_a_version_again_is_refused_and_the_active_model_stays(node, tmp_path, capsys):
    """An unscored model must never become the active one by taking an active version's name."""
    other = tmp_path / "other"
    assert main(["model", "point", "v1", "shipped", "--mask-threshold", "0.3", "--out", str(other),
                 "--config", str(node)]) == 2
    assert "version v1 is registered already" in capsys.readouterr().err
    assert not other.exists()  # refused before anything was written
    assert active(node, capsys) == ("v1", str((tmp_path / "v1").resolve()))


def test_a_name_taken_while_a_command_ran_leaves_its_checkpoint_unregistered_without_a_traceback(node, tmp_path, capsys):
    """`train` checks the name at its start and registers hours later; another run may have taken it since."""
    said = registered(load_config(node), tmp_path / "late", "v1", no_register=False)
    assert said.startswith(", not registered: version v1 is registered already")
    assert active(node, capsys) == ("v1", str((tmp_path / "v1").resolve()))


@pytest.mark.parametrize("bad", ["../../x", "a/b", "shipped", "active"])
def test_an_ensembles_version_name_is_checked_like_any_other(bad, tmp_path, capsys):
    config = write_node_config(tmp_path / "node", 11112, [])
    with pytest.raises(SystemExit) as stopped:
        main(["model", "combine", bad, "shipped", "shipped", "--out", str(tmp_path / "e"), "--config", str(config)])
    assert stopped.value.code == 2 and "is not a version name" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_an_ensemble_cannot_take_a_registered_versions_name(node, tmp_path, capsys):
    assert main(["model", "combine", "v1", "shipped", "v1", "--out", str(tmp_path / "e"), "--config", str(node)]) == 2
    assert "version v1 is registered already" in capsys.readouterr().err
    assert not (tmp_path / "e").exists() and active(node, capsys)[0] == "v1"


def test_training_refuses_a_registered_version_even_when_resuming(node, tmp_path, capsys):
    for resume in ([], ["--resume"]):
        code = main(["train", "--folder", str(empty_exports(tmp_path)), "--version", "v1", "--out", str(tmp_path / "new"),
                     "--data", str(tmp_path / "training"), *resume, "--config", str(node)])
        assert code == 2 and "version v1 is registered already" in capsys.readouterr().err
    assert not (tmp_path / "new").exists() and not (tmp_path / "training").exists()


def test_training_into_a_folder_that_holds_files_needs_resume(tmp_path, capsys):
    """A run must not write over another run's checkpoint; --resume still continues from the folder's state."""
    config = write_node_config(tmp_path / "node", 11112, [])
    out = tmp_path / "run"
    out.mkdir()
    (out / "state.pt").write_bytes(b"an earlier run's state")
    command = ["train", "--folder", str(empty_exports(tmp_path)), "--version", "v2", "--out", str(out),
               "--config", str(config)]
    assert main(command) == 2
    assert "holds files already" in capsys.readouterr().err
    assert (out / "state.pt").read_bytes() == b"an earlier run's state"
    assert main([*command, "--resume"]) == 2  # past the check: stops only for want of labelled series
    assert "no labelled series found" in capsys.readouterr().err


def _register(config: Path, folder: Path, version: str) -> None:
    registered(load_config(config), folder, version, no_register=False)  # as train and model point register


def _damaged(folder: Path, damage: str) -> None:
    """A copy of the shipped checkpoint (an ensemble of three heads) damaged as ``damage`` says."""
    folder.mkdir()
    if damage == "unreadable card":
        (folder / CARD_FILE).write_text("{not json")
        return
    shutil.copyfile(SHIPPED_MODEL / CARD_FILE, folder / CARD_FILE)
    if damage == "changed weights":
        (folder / WEIGHTS_FILE).write_bytes(b"not the weights the card records")
    elif damage == "missing member":
        shutil.copyfile(SHIPPED_MODEL / WEIGHTS_FILE, folder / WEIGHTS_FILE)


@pytest.mark.parametrize("damage,message", [("unreadable card", "holds no readable model card"),
                                            ("no weights", f"{WEIGHTS_FILE} is missing"),
                                            ("changed weights", "does not match the SHA-256"),
                                            ("missing member", "member-1.safetensors is missing")])
def test_a_damaged_model_is_never_activated(node, tmp_path, capsys, damage, message):
    """Activation checks what loading checks first (card, weights and their SHA-256), so a damaged version is
    refused at the admin's command, not at the next job; the active model stays."""
    _damaged(tmp_path / "broken", damage)
    _register(node, tmp_path / "broken", "broken")
    assert main(["model", "activate", "broken", "--config", str(node)]) == 2
    err = capsys.readouterr().err
    assert "broken cannot be activated" in err and message in err
    assert active(node, capsys) == ("v1", str((tmp_path / "v1").resolve()))


@pytest.mark.parametrize("start", [[], ["--start-from", "shipped"]])
def test_fine_tuning_checks_the_smallest_mask_as_a_fresh_run_does(start, tmp_path, capsys):
    config = write_node_config(tmp_path / "node", 11112, [])
    code = main(["train", *start, "--folder", str(empty_exports(tmp_path)), "--min-mask-pixels", "-5",
                 "--out", str(tmp_path / "model"), "--config", str(config)])
    assert code == 2 and "min_mask_pixels must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()
