"""The CLI and the outbox when the world is not as configured: a host that does not resolve, a database that
cannot be reached or was never created, an `analyze` folder without DICOM or with a bad --out."""

import json

import pytest
from sqlalchemy import select

from dicom_node.cli import main
from dicom_node.config import load_config
from dicom_node.outbox import FAILED, RetryPolicy, deliver_due, enqueue
from inference.model.card import CARD_FILE
from storage.database import make_engine, make_sessionmaker
from storage.models import Delivery
from tests.localpeers import free_port, write_node_config
from tests.synthetic import write_toy_ct

NOWHERE = "no-such-host.invalid"  # RFC 6761: never resolves
NOW = RetryPolicy(first_delay_s=0.0, give_up_after_s=0.0, min_attempts=3, timeout_s=5.0)  # dead letter at the 3rd failure
SQLITE_LINE = 'database_url = "sqlite:///./data/index.sqlite"'


def test_echo_to_a_host_that_does_not_resolve_fails_clearly(tmp_path, capsys):
    config = write_node_config(tmp_path, 11112, [{"ae_title": "PACS", "host": NOWHERE, "port": 104}])
    assert main(["echo", "PACS", "--config", str(config)]) == 1
    assert f"C-ECHO failed: PACS at {NOWHERE}:104: cannot resolve host '{NOWHERE}'" in capsys.readouterr().err


def test_an_unresolvable_destination_is_a_failed_attempt_and_becomes_a_dead_letter(tmp_path):
    config = load_config(write_node_config(tmp_path, 11112, [
        {"ae_title": "PACS", "host": NOWHERE, "port": 104, "allow": ["destination"]}]))
    sessions = make_sessionmaker(make_engine(config.storage.database_url))
    delivery = enqueue(sessions, "1.2.3.4", "1.2.840.10008.5.1.4.1.1.88.34", "sr.dcm", "PACS")
    assert deliver_due(config, sessions, config.storage.path, NOW) == {"sent": 0, "failed": 1}
    for _ in range(2):
        deliver_due(config, sessions, config.storage.path, NOW)
    with sessions() as session:
        row = session.get(Delivery, delivery)
        assert (row.status, row.attempts) == (FAILED, 3)
        assert f"cannot resolve host '{NOWHERE}'" in row.last_error


def _with_database(tmp_path, url: str):
    config = write_node_config(tmp_path, 11112, [])
    config.write_text(config.read_text().replace(SQLITE_LINE, f'database_url = "{url}"'))
    return config


@pytest.mark.parametrize("command", [["status"], ["model", "list"], ["resend", "1"]])
def test_a_database_that_cannot_be_reached_is_one_line_and_a_failure(command, tmp_path, capsys):
    config = _with_database(tmp_path, f"postgresql+psycopg://node:secret@127.0.0.1:{free_port()}/node")
    assert main([*command, "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: database postgresql+psycopg://node:***@127.0.0.1:") and err.count("\n") == 1, err
    assert "Connection refused" in err and "secret" not in err


def test_a_damaged_database_file_is_one_line_and_a_failure(tmp_path, capsys):
    config = write_node_config(tmp_path, 11112, [])
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "index.sqlite").write_bytes(b"not a database, but 100 bytes of something else" * 3)
    assert main(["status", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert err == f"error: database sqlite:///{tmp_path / 'data' / 'index.sqlite'}: file is not a database\n"


@pytest.mark.parametrize("command", [["status"], ["resend", "1"], ["retry", "1"]])
def test_a_read_only_command_on_a_node_that_never_ran_says_so_and_creates_nothing(command, tmp_path, capsys):
    config = write_node_config(tmp_path, 11112, [])
    assert main([*command, "--config", str(config)]) == 1
    assert f"error: no database at {tmp_path / 'data' / 'index.sqlite'}: start the node first" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_model_list_on_a_node_that_never_ran_shows_the_shipped_model_and_creates_nothing(tmp_path, capsys):
    config = write_node_config(tmp_path, 11112, [])
    assert main(["model", "list", "--config", str(config)]) == 0
    [first, *_] = capsys.readouterr().out.splitlines()
    assert first.startswith("* shipped")
    assert not (tmp_path / "data").exists()


def test_status_says_when_the_storage_folder_is_missing(tmp_path, capsys):
    config = _with_database(tmp_path, f"sqlite:///{tmp_path / 'db' / 'index.sqlite'}")
    make_engine(load_config(config).storage.database_url).dispose()  # a database, but no storage folder
    assert main(["status", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"free       unknown: no storage folder at {tmp_path / 'data'}" in out and "0.0 GiB" not in out
    assert not (tmp_path / "data").exists()


class _StandIns:
    """ModelCache's stand-in: every checkpoint is the engine tests' threshold model (the question is under test,
    not the model: LiteMedSAM is never loaded)."""

    def __init__(self, *_args):
        from tests.test_engine import ThresholdModel

        self.model = ThresholdModel()

    def get(self, _path):
        return self.model


@pytest.mark.parametrize("given,asked", [("Is there a fracture in this CT image?", "Is there a fracture in this CT image?"),
                                         ("", "Is there a nodule in this CT image?")])
def test_an_explicit_question_wins_over_the_routes(given, asked, tmp_path, monkeypatch):
    from dicom_node import analyze

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / CARD_FILE).write_text("{}")  # a model folder to the route; ModelCache is replaced
    route = '\n[[routes]]\nname = "ct"\nmodalities = ["CT"]\nquestion = "Is there a nodule in this CT image?"\nmodel = "model"\n'
    config = load_config(write_node_config(tmp_path, 11112, [], extra=route))
    write_toy_ct(tmp_path / "in", "-FF-")
    monkeypatch.setattr(analyze, "ModelCache", _StandIns)
    [summary] = analyze.analyze_folder(tmp_path / "in", tmp_path / "out", config, None, given, "cpu")
    assert summary["question"] == asked


def test_analyze_with_the_active_model_on_a_node_that_never_ran_uses_the_shipped_one_and_creates_no_database(
        tmp_path, monkeypatch):
    from dicom_node import analyze
    from dicom_node.model_registry import SHIPPED_MODEL

    asked = []

    class Recording(_StandIns):
        def get(self, path):
            asked.append(path)
            return self.model

    config = load_config(write_node_config(tmp_path, 11112, [], extra='\n[[routes]]\nname = "ct"\nmodalities = ["CT"]\n'
                                                                      'model = "active"\n'))
    write_toy_ct(tmp_path / "in", "-F-")
    monkeypatch.setattr(analyze, "ModelCache", Recording)
    [summary] = analyze.analyze_folder(tmp_path / "in", tmp_path / "out", config, None, "", "cpu")
    assert "error" not in summary and set(asked) == {SHIPPED_MODEL}
    assert not (tmp_path / "data").exists()


def test_analyze_on_a_folder_without_dicom_fails_before_any_model(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "README.txt").write_text("not DICOM")
    (tmp_path / "empty").mkdir()  # as --model: a load would fail, not load LiteMedSAM
    config = write_node_config(tmp_path, 11112, [])
    argv = ["analyze", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--model", str(tmp_path / "empty")]
    assert main([*argv, "--config", str(config)]) == 1
    captured = capsys.readouterr()
    assert f"error: no DICOM series in {tmp_path / 'in'} (1 files that are not DICOM instances)" in captured.err
    assert "0 series" not in captured.out and not (tmp_path / "out").exists()


@pytest.mark.parametrize("out", ["file", "file/below"])
def test_analyze_checks_out_before_any_work(out, tmp_path, capsys):
    write_toy_ct(tmp_path / "in", "-F-")
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("kept")
    config = write_node_config(tmp_path, 11112, [])
    argv = ["analyze", str(tmp_path / "in"), "--out", str(tmp_path / out), "--model", str(tmp_path / "empty")]
    assert main([*argv, "--config", str(config)]) == 2
    assert f"error: --out {tmp_path / out}: {tmp_path / 'file'} is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "file").read_text() == "kept"


def test_the_summary_still_lists_every_series(tmp_path, monkeypatch):
    """The checks above change nothing for a folder that has series: each is in summary.json."""
    from dicom_node import analyze

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / CARD_FILE).write_text("{}")  # a model folder to the route; ModelCache is replaced
    config = load_config(write_node_config(tmp_path, 11112, [],
                                           extra='\n[[routes]]\nname = "ct"\nmodalities = ["CT"]\nmodel = "model"\n'))
    write_toy_ct(tmp_path / "in" / "a", "-F-")
    write_toy_ct(tmp_path / "in" / "b", "--")
    monkeypatch.setattr(analyze, "ModelCache", _StandIns)
    summaries = analyze.analyze_folder(tmp_path / "in", tmp_path / "out", config, None, "", "cpu")
    assert len(json.loads((tmp_path / "out" / "summary.json").read_text())) == len(summaries) == 2


@pytest.mark.parametrize("extra", [[], ["--synthetic"]])
def test_training_from_a_folder_that_does_not_exist_says_so_before_any_work(tmp_path, capsys, extra):
    config = write_node_config(tmp_path, 11112, [])
    missing = tmp_path / "exports" / "missing"
    assert main(["train", "--folder", str(missing), *extra, "--data", str(tmp_path / "td"), "--config", str(config)]) == 2
    assert f"--folder {missing} is not a folder" in capsys.readouterr().err
    assert not (tmp_path / "td").exists()  # nothing synthesised, nothing encoded
