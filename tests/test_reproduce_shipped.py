"""The shipped model's reproduction recipe, read from its card: the runs as recorded, the ensemble, the point."""

import dataclasses
import os
import shlex
import subprocess

import pytest

from benchmarks.reproduce_shipped import SHIPPED, RecipeError, chosen, locked, recorded_train, reproduction_plan
from inference.model.card import CARD_FILE, ModelCard


def _shipped() -> ModelCard:
    return ModelCard.from_json((SHIPPED / CARD_FILE).read_text())


def _train_options(argv) -> dict:
    """`dicom-node train`'s parsed options, less those a reproduction sets itself."""
    from dicom_node.cli import _parser

    options = vars(_parser().parse_args(list(argv)))
    return {k: v for k, v in options.items() if k not in ("out", "data", "version", "resume", "func")}


def test_each_recorded_run_is_trained_again_as_recorded_into_the_work_folder(tmp_path):
    from dicom_node.cli import _parser

    card = _shipped()
    records = card.metrics["training"]["ensemble_of"]
    steps = reproduction_plan(card, tmp_path)
    trains = [s for s in steps if s.name.startswith("train ")]
    assert len(trains) == len(records) == len(card.members) + 1
    for step, record in zip(trains, records):
        recorded = shlex.split(record["command"])[1:]
        assert _train_options(step.argv) == _train_options(recorded)  # every option of the recorded run, as recorded
        again = vars(_parser().parse_args(list(step.argv)))
        assert again["out"] == tmp_path / "runs" / record["version"] and again["data"] == tmp_path / "data"
        assert again["resume"] and again["no_register"]
        assert step.done == again["out"] / "history.json"  # written last: a run cut off while evaluating goes on
    combine = next(s for s in steps if s.name == "combine")
    runs = [str(tmp_path / "runs" / r["version"]) for r in records]
    assert list(combine.argv[3:3 + len(runs)]) == runs  # the card's first run first: its heads name the finding
    assert combine.argv[combine.argv.index("--modality") + 1] == "MR"  # the members answer MR only


def test_the_point_step_gives_the_weights_the_shipped_operating_point(tmp_path):
    """`model point` run with the plan's options on the shipped weights writes the shipped card's point back."""
    from dicom_node.cli import main
    from tests.localpeers import write_node_config

    card = _shipped()
    point = next(s for s in reproduction_plan(card, tmp_path / "work") if s.name == "point")
    config = write_node_config(tmp_path / "node", 11112, [])
    # The combined runs' stand-in: the shipped weights at the point of the first run's recorded command, as
    # `model combine` leaves it (1.4.0's: 30 px, CT 2 and MR 3 slices, no aligned rule, the default threshold,
    # a reliability policy of the entropy alone, its worst slice rating a lesion, other cuts).
    first = ["model", "point", "first", str(SHIPPED), "--min-mask-pixels", "30", "--min-lesion-slices", "CT=2,MR=3",
             "--aligned-overlap", "none", "--mask-threshold", "none", "--reliability-cuts", "0.2,0.45",
             "--stability-weight", "0", "--lesion-rule", "worst", "--short-lesion-cap", "low", "--out", str(tmp_path / "first"),
             "--no-register"]
    assert main([*first, "--config", str(config)]) == 0
    standin = ModelCard.from_json((tmp_path / "first" / CARD_FILE).read_text())
    assert standin.mask_threshold is None and standin.aligned_lesion_overlap is None
    argv = list(point.argv)
    argv[argv.index(str(tmp_path / "work" / "combined"))] = str(tmp_path / "first")
    argv[argv.index("--out") + 1] = str(tmp_path / "again")
    assert main([*argv, "--config", str(config)]) == 0
    again = ModelCard.from_json((tmp_path / "again" / CARD_FILE).read_text())
    for name in ("mask_threshold", "min_lesion_slices", "aligned_lesion_overlap", "reliability", "version"):
        assert getattr(again, name) == getattr(card, name), name
    assert again.architecture == card.architecture


def test_a_single_run_is_pointed_without_an_ensemble_and_a_card_without_a_command_is_refused(tmp_path):
    card = dataclasses.replace(_shipped(), members=(), mask_threshold=None, aligned_lesion_overlap=None,
                               metrics={"training": {"command": "dicom-node train --synthetic --steps 5 --out=/x/y"}})
    steps = reproduction_plan(card, tmp_path)
    assert [s.name for s in steps] == [f"train {card.version}", "point", "score", "compare"]
    point = steps[1].argv
    assert point[3] == str(tmp_path / "runs" / card.version)
    assert point[point.index("--aligned-overlap") + 1] == "none" and point[point.index("--mask-threshold") + 1] == "none"
    assert "/x/y" not in steps[0].argv and "--out=/x/y" not in steps[0].argv
    with pytest.raises(RecipeError, match="without a recorded `dicom-node train` command"):
        reproduction_plan(dataclasses.replace(card, metrics={"training": {"final_loss": 0.2}}), tmp_path)


def test_recorded_options_keep_their_values_and_folders_are_replaced(tmp_path):
    argv = recorded_train("dicom-node train --folder FOLDER1 --data /old --version v1 --resume --steps 10 --out=/o",
                          tmp_path / "o", tmp_path / "d", "v2")
    assert argv == ("train", "--folder", "FOLDER1", "--steps", "10", "--version", "v2", "--out", str(tmp_path / "o"),
                    "--data", str(tmp_path / "d"), "--resume")


def test_a_chosen_step_runs_alone_and_an_unknown_name_is_refused_with_the_names(tmp_path):
    steps = reproduction_plan(_shipped(), tmp_path)
    last_run = next(s for s in reversed(steps) if s.name.startswith("train "))
    assert chosen(steps, [last_run.name, "score"]) == [last_run, next(s for s in steps if s.name == "score")]
    assert chosen(steps, []) == steps
    with pytest.raises(RecipeError, match=r"no step 'train mr16'; the steps are 'train 1\.4\.1'"):
        chosen(steps, ["train mr16"])


def test_one_reproduction_at_a_time_in_a_folder_even_where_its_runner_was_killed_alone(tmp_path):
    """Two runners in one folder trained into the same state.pt and cache files; a runner killed alone left its
    `train` step running, and a second runner started another beside it."""
    lock = locked(tmp_path)
    with pytest.raises(RecipeError, match="another reproduction"):
        locked(tmp_path)
    step = subprocess.Popen(["sleep", "60"], pass_fds=(lock,))  # a step the runner started, as main starts it
    os.close(lock)  # the runner gone
    try:
        with pytest.raises(RecipeError, match="a step one left running"):
            locked(tmp_path)
    finally:
        step.kill()
        step.wait()
    os.close(locked(tmp_path))  # free again once the step has ended


def test_where_bf16_is_emulated_the_autocast_runs_train_in_fp32_and_nothing_else_changes(tmp_path):
    """On CPUs without native bf16, 1.4.1's recorded --autocast made each of its 1,500 steps 40-50 times slower."""
    recorded = reproduction_plan(_shipped(), tmp_path)
    fp32 = reproduction_plan(_shipped(), tmp_path, autocast=False)
    first = recorded[0].argv
    assert "--autocast" in first and [a for a in first if a != "--autocast"] == list(fp32[0].argv)
    assert [s.argv for s in recorded[1:]] == [s.argv for s in fp32[1:]]  # the others were trained in fp32
