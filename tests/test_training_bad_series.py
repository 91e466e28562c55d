"""A hospital's own series that cannot be placed (an incomplete series, a SEG drawn elsewhere) must not stop
training: each is skipped with a warning naming its series UID, and the card says how many and why."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from tests.test_training import OracleModel
from training.dicom_io import SeriesHeader, write_ground_truth, write_series
from training.sources import LabeledSeries

SEG_FRAME = "SEG frame"  # how a reason that one SEG frame cannot be placed begins


def write_subject(folder: Path, patient_id: str, placeable: bool = True) -> LabeledSeries:
    """A 4-slice CT with a liver tumour on its last two slices, and its SEG. ``placeable=False``: the last slice's
    file is missing (an export or transfer that stopped short), so a SEG frame lies on no slice of the series."""
    voxels = np.full((4, 48, 48), -1000.0, np.float32)
    voxels[:, 4:44, 4:44] = 40.0
    mask = np.zeros(voxels.shape, bool)
    mask[2:4, 15:30, 15:30] = True
    voxels[mask] = 150.0
    paths = write_series(folder / patient_id, voxels, SeriesHeader(patient_id, "CT"), 5.0, 5.0)
    seg = write_ground_truth(folder / patient_id / "seg.dcm", paths, {"Liver tumor": mask})
    if not placeable:
        paths[-1].unlink()
        paths = paths[:-1]
    return LabeledSeries(patient_id, "CT", paths, seg, ("Liver tumor",))


def series_uid(item: LabeledSeries) -> str:
    return str(dcmread(item.series[0], stop_before_pixels=True).SeriesInstanceUID)


def node_config(tmp_path: Path) -> Path:
    from tests.localpeers import free_port, write_node_config

    return write_node_config(tmp_path / "node", free_port(), [])


@pytest.mark.slow
def test_a_series_that_cannot_be_placed_is_skipped_and_the_card_says_so(tmp_path, capsys, caplog):
    from dicom_node.cli import main

    caplog.set_level(logging.DEBUG, logger="training")
    for patient_id in ("PID-0501", "PID-0502", "PID-0503"):
        write_subject(tmp_path / "data", patient_id)
    bad = write_subject(tmp_path / "data", "PID-0599", placeable=False)
    out = tmp_path / "model"
    assert main(["train", "--folder", str(tmp_path / "data"), "--steps", "2", "--out", str(out), "--version", "v-skip",
                 "--quiet", "--config", str(node_config(tmp_path))]) == 0
    card = json.loads((out / "model_card.json").read_text())
    record = card["metrics"]["training"]
    assert record["series"] + record["held_out_series"] == 3  # the good ones, trained on and evaluated
    [skipped] = record["skipped_series"]
    assert skipped["modality"] == "CT" and SEG_FRAME in skipped["reason"]
    assert card["metrics"]["all"]["skipped_series"] == []  # none left for evaluation to meet
    # The card travels: the reason, but neither the series' UID nor its patient-named folder
    assert series_uid(bad) not in json.dumps(card) and "PID-05" not in json.dumps(card)
    first_line = capsys.readouterr().out.splitlines()[0]  # what the nightly job logs
    assert "registered (not active" in first_line and "1 series skipped" in first_line
    assert main(["model", "list", "--config", str(node_config(tmp_path))]) == 0
    assert "v-skip" in (listing := capsys.readouterr().out) and "1 series skipped" in listing  # what an admin activates
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(series_uid(bad) in m and SEG_FRAME in m for m in warnings)
    assert not [r for r in caplog.records if r.levelno >= logging.INFO and "PID-05" in r.getMessage()]


def test_evaluation_skips_a_held_out_series_that_cannot_be_placed(tmp_path, caplog):
    from training.evaluate import evaluate

    good = write_subject(tmp_path, "S1")
    bad = write_subject(tmp_path, "S2", placeable=False)
    metrics = evaluate([good, bad], OracleModel())
    assert metrics["CT"]["volumes"] == 1 and metrics["all"]["volumes"] == 1
    [skipped] = metrics["all"]["skipped_series"]
    assert skipped["modality"] == "CT" and SEG_FRAME in skipped["reason"]
    assert any(r.levelno == logging.WARNING and series_uid(bad) in r.getMessage() for r in caplog.records)


def test_training_with_nothing_placeable_ends_with_a_clear_error(tmp_path, capsys):
    from dicom_node.cli import main

    write_subject(tmp_path / "data", "PID-0601", placeable=False)
    out = tmp_path / "model"
    assert main(["train", "--folder", str(tmp_path / "data"), "--steps", "1", "--out", str(out), "--quiet",
                 "--config", str(node_config(tmp_path))]) == 2
    error = capsys.readouterr().err
    assert "error: none of the 1 labelled series can be placed" in error and SEG_FRAME in error
    assert "Traceback" not in error and not out.exists()


@pytest.mark.slow
def test_the_nightly_job_logs_why_training_on_the_store_failed(running_node, tmp_path, caplog):
    from dicom_node.jobs import JobService
    from tests.localpeers import storescu

    bad = write_subject(tmp_path / "export", "PID-0701", placeable=False)
    result = storescu(running_node.port, bad.series + [bad.segmentation], "DICOM_NODE", extra=["-R"])
    assert result.returncode == 0, result.stderr
    caplog.set_level(logging.INFO, logger="dicom_node")
    assert JobService(running_node.config).train() == 2
    [reported] = [r.getMessage() for r in caplog.records if "scheduled training did not produce a model" in r.getMessage()]
    assert "error: none of the 1 labelled series can be placed" in reported and SEG_FRAME in reported


def test_an_unexpected_failure_still_ends_in_an_error_line(tmp_path, capsys, monkeypatch):
    """The nightly job logs only the command's "error:" lines: a traceback alone read "no error message"."""
    import training.run
    from dicom_node.cli import main

    def out_of_memory(items, request):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(training.run, "run_training", out_of_memory)
    write_subject(tmp_path / "data", "PID-0801")
    assert main(["train", "--folder", str(tmp_path / "data"), "--out", str(tmp_path / "model"), "--quiet",
                 "--config", str(node_config(tmp_path))]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == ["error: training stopped: RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"]


def test_since_is_refused_where_it_cannot_filter(tmp_path, capsys):
    """--since filters the store's studies by the date the node indexed; a folder is trained on as exported."""
    from dicom_node.cli import main

    (tmp_path / "data").mkdir()
    assert main(["train", "--folder", str(tmp_path / "data"), "--since", "2026-06-01", "--out", str(tmp_path / "model"),
                 "--config", str(node_config(tmp_path))]) == 2
    assert "error: --since applies to --from-store" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()
