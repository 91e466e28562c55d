"""Training: synthetic data on real anatomy, DICOM round trip, sources, split, trainer, evaluation, CLI."""

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom import dcmread

from inference.ground_truth import read_segmentation
from inference.slicing import load_series
from tests.conftest import QUESTION
from tests.test_outputs_seg import dciodvfy_errors
from training.dicom_io import SeriesHeader, write_ground_truth, write_series
from training.sources import LabeledSeries, from_folder, split_by_subject
from training.text_metrics import bleu1, meteor, rouge_l


def test_text_metrics_follow_their_formulas():
    answer = "It is [SEG]. Brain tumor."
    assert bleu1(answer, answer) == rouge_l(answer, answer) == 1.0 and meteor(answer, answer) > 0.99
    assert bleu1("No findings.", answer) == pytest.approx(np.exp(1 - 7 / 3) * 1 / 3)  # only "." matches
    assert bleu1("It is [SEG]. Liver tumor.", answer) == pytest.approx(6 / 7)
    assert rouge_l("It is [SEG]. Liver tumor.", answer) == pytest.approx(6 / 7)
    # METEOR: 6 of 7 matched in two chunks: F-mean 6/7, penalty 0.5 * (2/6)^3.
    assert meteor("It is [SEG]. Liver tumor.", answer) == pytest.approx(6 / 7 * (1 - 0.5 * (2 / 6) ** 3))


def test_a_synthetic_brain_tumour_is_real_anatomy_with_a_visible_irregular_lesion():
    from training.anatomy import colin27
    from training.synthesis import brain_tumor_study

    head = colin27()
    study = brain_tumor_study(head, np.random.default_rng(5))
    again = brain_tumor_study(head, np.random.default_rng(5))
    np.testing.assert_array_equal(study.voxels, again.voxels)  # a seed is a subject
    [(label, mask)] = study.masks.items()
    assert label == "Brain tumor" and study.modality == "MR" and study.slice_mm == 5.0
    assert 2 <= mask.any(axis=(1, 2)).sum() <= 10  # 14 to 44 mm across on 5 mm slices
    ring = np.zeros_like(mask)
    for k in np.flatnonzero(mask.any(axis=(1, 2))):
        from scipy import ndimage
        ring[k] = ndimage.binary_dilation(mask[k], iterations=4) & ~ndimage.binary_dilation(mask[k], iterations=1)
    around = np.median(study.voxels[ring])
    differs = np.abs(study.voxels[mask] - around) / around > 0.2  # brighter, darker, or a bright rim round a dark core
    assert differs.mean() > 0.5  # a lesion a reader can see
    clear = brain_tumor_study(head, np.random.default_rng(6), positive=False)
    assert clear.masks == {}


@pytest.mark.parametrize("region,label", [("abdomen", None), ("chest", "Lung nodule")])
def test_ct_phantoms_have_hounsfield_units_and_lesions_inside_their_organs(region, label):
    from training.synthesis import ct_study

    study = ct_study(np.random.default_rng(3), region, lesions=2)
    hu = study.voxels
    assert study.modality == "CT" and hu.shape[1:] == (256, 256)
    assert np.median(hu[:, :8, :8]) == pytest.approx(-1000, abs=40)  # air outside the body
    if region == "chest":
        assert np.percentile(hu[:, 100:160, 60:100], 50) < -600  # lung
    assert study.masks and (label is None or set(study.masks) == {label})
    for mask in study.masks.values():
        assert 0 < mask.sum() < 0.02 * mask.size
        assert -100 < np.median(hu[mask]) < 250  # soft tissue, not air or bone
    # one mask per lesion, none shared, together the label's mask: the evaluation counts lesions, not blobs
    assert len(study.lesions) == 2
    for name, union in study.masks.items():
        parts = [mask for l, mask in study.lesions if l == name]
        assert sum(int(m.sum()) for m in parts) == int(union.sum()) and np.array_equal(np.any(parts, axis=0), union)


def test_a_synthetic_study_round_trips_as_dicom_through_the_inference_pipeline(tmp_path):
    rng = np.random.default_rng(0)
    voxels = rng.normal(40, 10, (6, 32, 40)).astype(np.float32)
    mask = np.zeros(voxels.shape, bool)
    mask[2:4, 10:20, 12:25] = True
    voxels[mask] = 120
    paths = write_series(tmp_path / "ct", voxels, SeriesHeader("SUBJ-1", "CT", body_part="ABDOMEN"), 1.5, 5.0)
    seg = write_ground_truth(tmp_path / "seg.dcm", paths, {"Liver tumor": mask})
    assert dciodvfy_errors(seg) == []
    volume = load_series(paths[::-1])
    np.testing.assert_allclose(volume.voxels, np.round(voxels), atol=0.5)
    assert volume.spacing == pytest.approx((1.5, 1.5, 5.0))
    [segment] = read_segmentation(seg, volume)
    assert segment.label == "Liver tumor"
    np.testing.assert_array_equal(segment.mask, mask)
    empty = write_ground_truth(tmp_path / "clear.dcm", paths, {"Liver tumor": np.zeros_like(mask)})
    assert dciodvfy_errors(empty) == [] and not read_segmentation(empty, volume)[0].mask.any()
    [item] = from_folder(tmp_path)  # the latest SEG per series
    assert item.subject == "SUBJ-1" and item.modality == "CT" and item.segmentation == empty



def test_the_latest_seg_of_a_series_is_chosen_by_number_not_by_text(tmp_path):
    """Content Date, Time and Instance Number were compared as one string: instance 9 came after instance 10."""
    mask = np.zeros((4, 32, 40), bool)
    mask[1:3, 10:20, 12:25] = True
    paths = write_series(tmp_path / "ct", np.zeros(mask.shape, np.float32), SeriesHeader("SUBJ-1", "CT"), 1.5, 5.0)
    for name, number in (("a.dcm", 10), ("b.dcm", 9)):  # b, read last, won the tie of the text comparison
        path = write_ground_truth(tmp_path / name, paths, {"Liver tumor": mask})
        ds = dcmread(path)
        ds.ContentDate, ds.ContentTime, ds.InstanceNumber = "20260101", "120000", number
        ds.save_as(path)
    [item] = from_folder(tmp_path)
    assert item.segmentation == tmp_path / "a.dcm"

def test_the_split_never_puts_one_subject_on_both_sides():
    items = [LabeledSeries(f"S{i // 2}", "CT" if i % 4 < 2 else "MR", [Path(f"{i}")], Path("seg")) for i in range(40)]
    train, held_out = split_by_subject(items, held_out=0.25, seed=1)
    assert {i.subject for i in train}.isdisjoint({i.subject for i in held_out})
    assert len(train) + len(held_out) == 40
    for modality in ("CT", "MR"):
        subjects = {i.subject for i in held_out if i.modality == modality}
        assert len(subjects) == 2  # a quarter of each modality's 10 subjects, rounded
    assert split_by_subject(items, 0.25, 1) == (train, held_out)



def test_a_subject_with_a_ct_and_an_mr_is_held_out_in_both_or_neither():
    """Held-out subjects were drawn per modality: a patient with both in the store could train in one and be
    scored in the other."""
    both = [LabeledSeries(f"P{i}", m, [Path(f"{m}{i}")], Path("seg")) for i in range(20) for m in ("CT", "MR")]
    single = [LabeledSeries(f"{m}-only-{i}", m, [Path(f"{m}-only-{i}")], Path("seg"))
              for m, count in (("CT", 8), ("MR", 16)) for i in range(count)]
    items = both + single
    train, held_out = split_by_subject(items, held_out=0.25, seed=0)
    assert {i.subject for i in train}.isdisjoint({i.subject for i in held_out})
    assert sorted(str(i.series[0]) for i in train + held_out) == sorted(str(i.series[0]) for i in items)
    for modality in ("CT", "MR"):
        subjects = {i.subject for i in items if i.modality == modality}
        chosen = {i.subject for i in held_out if i.modality == modality}
        assert abs(len(chosen) / len(subjects) - 0.25) < 0.05  # about a quarter of each modality
    assert split_by_subject(items, 0.25, 0) == (train, held_out)


def test_the_synthetic_split_is_each_modalitys_own_draw():
    """Synthetic subjects have one modality each: their split (and so the shipped model's held-out figures, and
    the benchmarks that name the held-out subjects) stays held_out_subjects of each modality's names, the
    items in modality order as training has always read them."""
    from training.sources import held_out_subjects, synthetic_subject

    for mr, ct in ((80, 80), (160, 80), (160, 0), (40, 40)):
        names = {m: [synthetic_subject(m, i) for i in range(count)] for m, count in (("MR", mr), ("CT", ct))}
        items = [LabeledSeries(name, m, [Path(name)], Path("seg")) for m, subjects in names.items() for name in subjects]
        chosen = held_out_subjects(names["MR"]) | held_out_subjects(names["CT"])
        in_order = [i for m in ("CT", "MR") for i in items if i.modality == m]
        assert split_by_subject(items) == ([i for i in in_order if i.subject not in chosen],
                                           [i for i in in_order if i.subject in chosen])

def test_the_store_gives_the_readers_latest_seg_and_never_the_nodes_own(running_node, tmp_path):
    from dicom_node.outputs.seg import AlgorithmInfo, build_seg
    from inference.findings import SliceFinding, aggregate
    from inference.reliability import Reliability
    from tests.localpeers import storescu
    from training.sources import from_store

    voxels = np.full((4, 32, 32), 40.0, np.float32)
    mask = np.zeros(voxels.shape, bool)
    mask[1:3, 5:15, 5:15] = True
    paths = write_series(tmp_path / "ct", voxels, SeriesHeader("SUBJ-9", "CT"), 1.0, 5.0)
    reader = write_ground_truth(tmp_path / "gt" / "reader.dcm", paths, {"Kidney tumor": mask})
    volume = load_series(paths)
    lesions = aggregate(volume, [SliceFinding(k, "Liver tumor", mask[k], 0.9, Reliability.HIGH) for k in (1, 2)], 0.0)
    ours = build_seg([dcmread(p) for p in paths], volume, lesions, AlgorithmInfo("dicom-node built-in", "1"))
    ours.save_as(tmp_path / "gt" / "ours.dcm")
    result = storescu(running_node.port, paths + [reader, tmp_path / "gt" / "ours.dcm"], "DICOM_NODE", extra=["-R"])
    assert result.returncode == 0, result.stderr
    with running_node.node.sessions() as session:
        found = from_store(session, running_node.config.storage.path)
        assert from_store(session, running_node.config.storage.path, modality="MR") == []
        assert from_store(session, running_node.config.storage.path, label="kidney") == found
    [item] = found
    assert item.subject == "SUBJ-9" and item.labels == ("Kidney tumor",) and len(item.series) == 4
    assert dcmread(item.segmentation).SOPInstanceUID == dcmread(reader).SOPInstanceUID


def tiny_training_set(context=None):
    """Four CT slices, two with a finding; ``context``: the detail branch's neighbours each side (its stacks kept)."""
    from training.dataset import SliceSample
    from training.detail_stacks import DetailStacks
    from training.trainer import TrainingSet

    rng = np.random.default_rng(0)
    samples, masks = [], np.zeros((1, 256, 256), bool)
    masks[0, 100:140, 100:140] = True
    for i in range(4):
        positive = i % 2 == 0
        samples.append(SliceSample(np.zeros((256, 256), np.float32), masks if positive else np.zeros((0, 256, 256), bool),
                                   ("Liver tumor",) if positive else (), "1.2.3", i, "CT"))
    stacks = None
    if context is not None:  # each slice's stack of random neighbours, as a series of its own
        width = 2 * context + 1
        volumes = rng.uniform(0, 1, (4, width, 256, 256)).astype(np.float32)
        stacks = DetailStacks(tuple(volumes), np.arange(4), np.tile(np.arange(width), (4, 1)))
    return TrainingSet(samples, torch.from_numpy(rng.normal(size=(4, 256, 64, 64)).astype(np.float32)).to(torch.bfloat16), stacks)


@pytest.mark.parametrize("context,dropout", [(None, 0.0), (1, 0.0), (None, 0.3)])
def test_training_resumes_exactly_where_it_stopped(tmp_path, context, dropout):
    """Also for a model with a detail branch, whose input is augmented from the trainer's random state, and
    with feature dropout, drawn from torch's."""
    from inference.model.builtin import BuiltinModel
    from tests.conftest import TINY, tiny_card
    from training.trainer import TrainConfig, Trainer

    config = TrainConfig(steps=4, batch_size=2, checkpoint_every=2, warmup_steps=1, feature_dropout=dropout)
    architecture = TINY if context is None else TINY | {"detail_width": 8, "context_slices": context}

    def fresh():
        torch.manual_seed(0)
        return BuiltinModel.new(tiny_card(architecture=architecture))

    straight = fresh()
    Trainer(straight, tiny_training_set(context), config, tmp_path / "a").train(progress=False)
    interrupted = fresh()
    Trainer(interrupted, tiny_training_set(context), config, tmp_path / "b").train(progress=False, until=2)  # then "killed"
    resumed = fresh()
    trainer = Trainer(resumed, tiny_training_set(context), config, tmp_path / "b")
    assert trainer.resume() and trainer.step == 2
    history = trainer.train(progress=False)
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    for (name, a), b in zip(straight.network.trainable_state_dict().items(), resumed.network.trainable_state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    if dropout:  # the dropout acts: without it the same steps end elsewhere
        undropped = fresh()
        Trainer(undropped, tiny_training_set(context), dataclasses.replace(config, feature_dropout=0.0), tmp_path / "c").train(progress=False)
        assert any(not torch.equal(a, b) for a, b in zip(straight.network.trainable_state_dict().values(),
                                                         undropped.network.trainable_state_dict().values()))


def test_fine_tuning_starts_from_the_checkpoints_weights_and_keeps_what_it_could_say(tmp_path):
    """--start-from: the trained heads and decoder, not fresh ones; findings and modalities the starting model
    had stay sayable; a checkpoint of another shape or encoder precision is refused by name."""
    from inference.model.builtin import BuiltinModel
    from tests.conftest import TINY, tiny_card
    from training.run import TrainingDataError, starting_model
    from training.trainer import TrainConfig, Trainer

    architecture = TINY | {"detail_width": 8, "context_slices": 1}
    torch.manual_seed(0)
    base = BuiltinModel.new(tiny_card(architecture=architecture, findings=("Brain tumor",), modalities=("MR",)))
    Trainer(base, tiny_training_set(1), TrainConfig(steps=2, batch_size=2, warmup_steps=1), tmp_path / "base").train(progress=False)
    base.save(tmp_path / "base")
    trained = base.network.trainable_state_dict()

    card = tiny_card(architecture=architecture, findings=("Liver tumor",), modalities=("CT",))
    torch.manual_seed(1)
    model, started = starting_model(card, tmp_path / "base", torch.device("cpu"))
    assert started is not None and started.weights_sha256 == base.card.weights_sha256
    for name, weight in model.network.trainable_state_dict().items():
        torch.testing.assert_close(weight, trained[name], msg=name)
    assert model.card.findings == ("Brain tumor", "Liver tumor") and model.card.modalities == ("CT", "MR")
    fresh, none = starting_model(card, None, torch.device("cpu"))
    assert none is None and not torch.equal(fresh.network.trainable_state_dict()["detail.full.0.weight"], trained["detail.full.0.weight"])

    with pytest.raises(TrainingDataError, match="another architecture"):
        starting_model(tiny_card(architecture=architecture | {"detail_width": 16}), tmp_path / "base", torch.device("cpu"))
    with pytest.raises(TrainingDataError, match="another architecture"):
        starting_model(tiny_card(architecture=TINY), tmp_path / "base", torch.device("cpu"))  # fewer parts: no detail branch
    with pytest.raises(TrainingDataError, match="trained on a fp32 encoder, not bf16"):
        starting_model(tiny_card(architecture=architecture, encoder_precision="bf16"), tmp_path / "base", torch.device("cpu"))
    with pytest.raises(TrainingDataError, match="cannot start from"):
        starting_model(card, tmp_path, torch.device("cpu"))  # no checkpoint there


def test_hard_negatives_are_the_slices_the_model_would_report(trained_detail):
    """Mining scores a slice as the node decides it (the "It is [SEG]" query's mask through the detail branch):
    offered both of the toy's slices as if clear, it picks the one where the model draws its lesion, and does so
    exactly where the model's own answer at that many pixels is a finding."""
    from training.hard_negatives import hard_negatives, query_mask_pixels

    model, images, embeddings, _, _, stacks = trained_detail
    network = model.network
    pixels = query_mask_pixels(network, embeddings, stacks, np.arange(2), "CT")
    assert pixels[0] >= 1000 and pixels[1] < 5  # the toy's lesion (40 x 40 px) and its clear slice
    for least in (5, int(pixels[0]), int(pixels[0]) + 1):
        mined = hard_negatives(network, embeddings, stacks, {"CT": np.array([0, 1])}, least)
        answers = model.interpret_embeddings(embeddings, QUESTION, slices=stacks) if least == 5 else None
        assert list(mined) == ["CT"] and mined["CT"].tolist() == ([0] if least <= pixels[0] else [])
        if answers is not None:  # the node's own decision at the card's 5 px agrees
            assert [bool(len(a.answer.masks)) for a in answers] == [True, False]
    assert not network.training  # left as it was found


def test_the_hard_negative_phase_draws_mined_slices_and_resumes_exactly(tmp_path):
    """After ``steps`` the trainer mines once and then fills ``hard_negative_fraction`` of each batch's clear
    slices from the mined ones (here all of them), at a restarted lower rate; stopped inside the phase and
    resumed, it ends with the weights and mined slices of an uninterrupted run."""
    from inference.model.builtin import BuiltinModel
    from tests.conftest import TINY, tiny_card
    from training.trainer import TrainConfig, Trainer

    config = TrainConfig(steps=2, batch_size=4, checkpoint_every=1, warmup_steps=1, hard_negative_steps=3,
                         hard_negative_fraction=1.0, hard_negative_pixels=1)
    architecture = TINY | {"decision": "decoder", "detail_width": 8, "context_slices": 1}

    def fresh():
        torch.manual_seed(0)
        return BuiltinModel.new(tiny_card(architecture=architecture))

    straight = Trainer(fresh(), tiny_training_set(1), config, tmp_path / "a")
    drawn = []
    batch = straight.batch
    straight.batch = lambda: drawn.append([int(i) for i in batch()]) or drawn[-1]
    history = straight.train(progress=False)
    assert [h["step"] for h in history] == [1, 2, 3, 4, 5]
    assert straight.hard is not None and set(straight.hard) == {"CT"}
    # An untrained toy draws some mask everywhere, so at 1 pixel both clear slices are hard (and no slice
    # with a finding is ever mined); a batch of 4 holds 1 slice with a finding and 3 clear ones.
    assert straight.hard["CT"].tolist() == [1, 3] and len(drawn) == 5
    assert all(sorted(i in (1, 3) for i in b) == [False, True, True, True] for b in drawn)
    chooser = Trainer(fresh(), tiny_training_set(1), config, tmp_path / "c")
    chooser.hard = {"CT": np.array([3])}  # as if only slice 3 had been mined
    before = [chooser.batch() for _ in range(50)]
    chooser.step = config.steps
    during = [chooser.batch() for _ in range(50)]
    assert any(1 in b for b in before) and not any(1 in b for b in during)  # the phase draws clear slices from the mined
    assert all(b.count(3) == 3 for b in during)
    rates = [straight._factor(step) for step in range(5)]
    assert rates[2] == pytest.approx(config.hard_negative_learning_rate) and rates[2] > rates[3] > rates[4] >= 0.05
    interrupted = Trainer(fresh(), tiny_training_set(1), config, tmp_path / "b")
    interrupted.train(progress=False, until=3)  # killed inside the phase, after mining
    resumed = Trainer(fresh(), tiny_training_set(1), config, tmp_path / "b")
    assert resumed.resume() and resumed.step == 3 and resumed.hard is not None
    assert {m: v.tolist() for m, v in resumed.hard.items()} == {m: v.tolist() for m, v in straight.hard.items()}
    resumed.train(progress=False)
    for (name, a), b in zip(straight.model.network.trainable_state_dict().items(),
                            resumed.model.network.trainable_state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)


def test_hard_negative_cycles_restart_mine_again_and_end_on_their_mean_weights(tmp_path):
    """With two cycles the rate restarts at each cycle's start and the slices are mined again there from the
    weights of that moment; with ``average_cycles`` the model ends holding the mean of the weights at the two
    cycles' ends, also when stopped inside the second cycle and resumed."""
    from inference.model.builtin import BuiltinModel
    from tests.conftest import TINY, tiny_card
    from training.trainer import TrainConfig, Trainer

    config = TrainConfig(steps=2, batch_size=4, checkpoint_every=1, warmup_steps=1, hard_negative_steps=4,
                         hard_negative_cycles=2, average_cycles=True, hard_negative_pixels=1)
    architecture = TINY | {"decision": "decoder", "detail_width": 8, "context_slices": 1}

    def fresh():
        torch.manual_seed(0)
        return BuiltinModel.new(tiny_card(architecture=architecture))

    rates = [Trainer(fresh(), tiny_training_set(1), config, tmp_path / "r")._factor(step) for step in range(6)]
    assert rates[2] == rates[4] == pytest.approx(config.hard_negative_learning_rate)
    assert rates[2] > rates[3] >= 0.05 and rates[4] > rates[5] >= 0.05
    straight = Trainer(fresh(), tiny_training_set(1), config, tmp_path / "a")
    mined_at, ends = [], []
    mine, add = straight.mine, straight.add_to_average
    straight.mine = lambda: mined_at.append(straight.step) or mine()
    straight.add_to_average = lambda: ends.append({k: v.clone() for k, v in
                                                   straight.model.network.trainable_state_dict().items()}) or add()
    straight.train(progress=False)
    assert mined_at == [2, 4] and len(ends) == straight.averaged == 2
    final = straight.model.network.trainable_state_dict()
    moved = [k for k in final if final[k].is_floating_point() and not torch.equal(ends[0][k], ends[1][k])]
    assert moved  # the two ends differ, so their mean is neither
    for k in moved:
        torch.testing.assert_close(final[k], (ends[0][k] + ends[1][k]) / 2, msg=k)
    interrupted = Trainer(fresh(), tiny_training_set(1), config, tmp_path / "b")
    interrupted.train(progress=False, until=5)  # killed inside the second cycle, after its mining
    resumed = Trainer(fresh(), tiny_training_set(1), config, tmp_path / "b")
    assert resumed.resume() and resumed.step == 5 and resumed.averaged == 1
    assert {m: v.tolist() for m, v in resumed.hard.items()} == {m: v.tolist() for m, v in straight.hard.items()}
    resumed.train(progress=False)
    for name, value in resumed.model.network.trainable_state_dict().items():
        torch.testing.assert_close(value, final[name], msg=name)


def test_train_config_refuses_a_meaningless_hard_negative_phase():
    from training.trainer import TrainConfig

    for bad in ({"hard_negative_steps": -1}, {"hard_negative_fraction": 1.5}, {"hard_negative_pixels": 0},
                {"hard_negative_learning_rate": 0.0}, {"hard_negative_steps": 300, "hard_negative_cycles": 7},
                {"hard_negative_cycles": 0}, {"average_cycles": True}, {"feature_dropout": 1.0}, {"feature_dropout": -0.1}, {"learning_rate": 0.0}, {"decoder_learning_rate": float("nan")}, {"lesion_weight": 0.0}, {"lesion_weight": -2.0}, {"lesion_weight": float("nan")}):
        with pytest.raises(ValueError):
            TrainConfig(**bad)


def test_autocast_training_follows_fp32_training_and_keeps_fp32_weights(tmp_path):
    """bf16 autocast (``TrainConfig.autocast``) changes the arithmetic, not what is learnt: the same steps give
    losses within bf16's rounding of fp32 training's, the weights stay fp32, and they do differ (it did run)."""
    from inference.model.builtin import BuiltinModel
    from tests.conftest import TINY, tiny_card
    from training.trainer import TrainConfig, Trainer

    architecture = TINY | {"detail_width": 8, "context_slices": 1}
    runs = {}
    for autocast in (False, True):
        torch.manual_seed(0)
        model = BuiltinModel.new(tiny_card(architecture=architecture), device=torch.device("cpu"))
        config = TrainConfig(steps=4, batch_size=2, checkpoint_every=100, warmup_steps=1, autocast=autocast)
        history = Trainer(model, tiny_training_set(1), config, tmp_path / str(autocast)).train(progress=False)
        runs[autocast] = ([h["loss"] for h in history], model.network.trainable_state_dict())
    (fp32_losses, fp32_weights), (mixed_losses, mixed_weights) = runs[False], runs[True]
    np.testing.assert_allclose(mixed_losses, fp32_losses, rtol=0.05)
    assert all(v.dtype == torch.float32 for v in mixed_weights.values() if v.is_floating_point())
    assert any(not torch.equal(a, b) for a, b in zip(fp32_weights.values(), mixed_weights.values()))


def test_mirrored_copies_carry_mirrored_masks_and_their_own_encoding(tmp_path):
    """Mirror augmentation: each training slice gains a left-right mirrored copy whose mask is mirrored with
    it and whose embedding the encoder computes from the mirrored slice (the encoder is not mirror-symmetric,
    so flipping the slice's embedding would teach the decoder features it never meets)."""
    from inference.model.builtin import BuiltinModel
    from tests.conftest import tiny_card
    from training.cache import EmbeddingCache
    from training.dataset import SliceSample
    from training.run import with_mirrored
    from training.trainer import TrainingSet

    model = BuiltinModel.new(tiny_card())
    image = np.zeros((256, 256), np.float32)
    image[60:200, 40:150] = 0.6  # an asymmetric body
    image[90:120, 50:70] = 1.0  # and a lesion on its left
    mask = np.zeros((1, 256, 256), bool)
    mask[0, 90:120, 50:70] = True
    cache = EmbeddingCache(tmp_path / "cache", model)
    data = TrainingSet([SliceSample(image, mask, ("Liver tumor",), "1.2.3", 0, "CT")], cache.stored(image[None]))
    both = with_mirrored(data, cache)
    assert len(both.samples) == len(both.embeddings) == 2 and both.samples[0] is data.samples[0]
    copy = both.samples[1]
    assert copy.labels == ("Liver tumor",) and copy.masks[0, 90:120, 186:206].all() and copy.masks.sum() == mask.sum()
    assert (copy.image == image[:, ::-1]).all()
    encoded = model.encode(copy.image[None]).to(torch.bfloat16)
    torch.testing.assert_close(both.embeddings[1:].float(), encoded.float(), atol=0.05, rtol=0.05)
    assert not torch.allclose(both.embeddings[1:].float(), data.embeddings[:].flip(-1).float(), atol=0.05, rtol=0.05)


def test_intensity_augmentation_changes_grey_levels_alike_across_a_slices_neighbours():
    from training.trainer import augment_intensity

    ramp = np.tile(np.linspace(0, 1, 256, dtype=np.float32), (256, 1))
    stacks = np.stack([np.stack([ramp, ramp, ramp])] * 64)  # 64 samples, each three equal slices
    out = augment_intensity(stacks, np.random.default_rng(0))
    assert out.shape == stacks.shape and out.dtype == np.float32 and 0 <= out.min() and out.max() <= 1
    assert np.abs(out - stacks).mean() > 0.02  # grey levels do change
    means = out.mean(axis=(2, 3))  # (64, 3): one transform per sample: its three slices agree but for noise
    assert np.abs(means - means[:, :1]).max() < 0.01 and means[:, 1].std() > 0.02
    np.testing.assert_array_equal(out, augment_intensity(stacks, np.random.default_rng(0)))  # seeded


class OracleModel:
    """Answers with whatever is brighter than the window (the lesions the test draws), or misses everything."""

    input_size = 64
    version = "oracle"

    def __init__(self, blind=False, min_lesion_slices=1):
        from inference.model.card import ReliabilityPolicy
        from inference.model.protocol import ModelScope
        from inference.preprocess import Normalization

        self.blind, self.scope, self.normalization = blind, ModelScope(("CT",)), Normalization()
        self.reliability = ReliabilityPolicy(samples=2)
        self.min_lesion_slices = min_lesion_slices

    def interpret(self, images, question, samples=0, temperature=0.7, seed=0):
        from inference.model.protocol import Answer, Interpretation

        out = []
        for image in images:
            mask = image > 0.95
            if mask.any() and not self.blind:
                answer = Answer("It is [SEG]. Liver tumor.", mask[None], np.array([0.9], np.float32))
                out.append(Interpretation(answer, (answer,) * samples))
            else:
                out.append(Interpretation(Answer("No findings.", np.zeros((0, 64, 64), bool))))
        return out


def test_evaluation_scores_a_perfect_and_a_blind_model_through_the_engine(tmp_path):
    from training.evaluate import evaluate

    voxels = np.full((8, 64, 64), 40.0, np.float32)
    mask = np.zeros(voxels.shape, bool)
    mask[2:5, 20:40, 22:40] = True
    mask[6, 50:56, 50:56] = True  # a second lesion, one slice
    voxels[mask] = 400.0
    mask[7, 10, 10] = True  # a faint speck of 0.005 ml, under what the node reports (0.05 ml): no lesion to find
    voxels[7, 10, 10] = 150.0
    paths = write_series(tmp_path / "ct", voxels, SeriesHeader("S1", "CT"), 1.0, 5.0)
    item = LabeledSeries("S1", "CT", paths, write_ground_truth(tmp_path / "seg.dcm", paths, {"Liver tumor": mask}), ("Liver tumor",))

    perfect = evaluate([item], OracleModel())["CT"]
    assert perfect["true_lesions"] == 2 and perfect["true_lesions_below_reportable"] == 1
    assert perfect["lesion_sensitivity"] == 1.0
    assert perfect["false_positives_per_volume"] == 0.0 and perfect["mean_dice_detected_lesions"] == 1.0
    assert perfect["finding_accuracy"] == 1.0 and perfect["bleu1"] == 1.0 and perfect["slice_dice"] == 1.0
    assert perfect["reliability_calibration"] == {"high": {"slices": 4, "error_rate": 0.0}}
    blind = evaluate([item], OracleModel(blind=True))["CT"]
    assert blind["lesion_sensitivity"] == 0.0 and blind["finding_accuracy"] == pytest.approx(4 / 8)
    assert blind["mean_dice_detected_lesions"] is None and blind["slice_dice"] == 0.0
    # A model whose operating point drops single-slice lesions: its answer on slice 6 was right, but the node
    # sends nothing there; finding accuracy is what the node sends, answer_finding_accuracy what it answered.
    strict = evaluate([item], OracleModel(min_lesion_slices=2))["CT"]
    assert strict["lesion_sensitivity"] == 0.5 and strict["false_positives_per_volume"] == 0.0
    assert strict["finding_accuracy"] == pytest.approx(7 / 8) and strict["answer_finding_accuracy"] == 1.0


class DoubtfulOracle(OracleModel):
    """The oracle, but its sampled answers disagree on slices where something bright lies near the top edge."""

    def interpret(self, images, question, samples=0, temperature=0.7, seed=0):
        from inference.model.protocol import NO_FINDINGS, Answer, Interpretation

        out = super().interpret(images, question, samples, temperature, seed)
        for n, (image, interpretation) in enumerate(zip(images, out)):
            if (image[:12] > 0.95).any():
                empty = Answer(NO_FINDINGS, np.zeros((0, 64, 64), bool))
                out[n] = Interpretation(interpretation.answer, (interpretation.answer, empty))
        return out


def test_lesion_calibration_says_how_often_a_reported_lesion_of_each_level_is_false(tmp_path):
    from training.evaluate import evaluate

    voxels = np.full((8, 64, 64), 40.0, np.float32)
    mask = np.zeros(voxels.shape, bool)
    mask[3:6, 20:40, 22:40] = True
    voxels[mask] = 400.0
    voxels[0:2, 2:8, 50:60] = 400.0  # bright, but no lesion in the truth: the model's doubt is right
    paths = write_series(tmp_path / "ct", voxels, SeriesHeader("S1", "CT"), 1.0, 5.0)
    item = LabeledSeries("S1", "CT", paths, write_ground_truth(tmp_path / "seg.dcm", paths, {"Liver tumor": mask}), ("Liver tumor",))

    metrics = evaluate([item], DoubtfulOracle())["CT"]
    assert metrics["false_positives_per_volume"] == 1.0 and metrics["lesion_sensitivity"] == 1.0
    # Two answers in two groups: ln 2 = 0.69 nats, between the card's 0.35 and 0.8: "medium".
    assert metrics["lesion_reliability_calibration"] == {"high": {"lesions": 1, "false_positive_rate": 0.0},
                                                         "medium": {"lesions": 1, "false_positive_rate": 1.0}}
    assert metrics["reliability_calibration"] == {"high": {"slices": 3, "error_rate": 0.0},
                                                  "medium": {"slices": 2, "error_rate": 1.0}}


def test_a_tracked_lesion_in_parts_is_one_lesion_and_trains_as_one_finding(tmp_path):
    from training.dataset import series_samples
    from training.evaluate import evaluate

    voxels = np.full((8, 64, 64), 40.0, np.float32)
    tumour, satellite = np.zeros(voxels.shape, bool), np.zeros(voxels.shape, bool)
    tumour[2:5, 20:40, 22:40] = True
    satellite[4:6, 50:56, 50:56] = True  # apart from the tumour, fainter: the oracle does not see it
    voxels[tumour], voxels[satellite] = 400.0, 200.0
    other = np.zeros(voxels.shape, bool)
    other[3, 5:12, 5:12] = True  # a second tumour of the same label, on a slice the first one covers
    voxels[other] = 400.0
    paths = write_series(tmp_path / "ct", voxels, SeriesHeader("S1", "CT"), 1.0, 5.0)
    tracked = write_ground_truth(tmp_path / "tracked.dcm", paths, [("Liver tumor", tumour | satellite), ("Liver tumor", other)])
    assert dciodvfy_errors(tracked) == []
    segments = read_segmentation(tracked, load_series(paths))
    assert [s.label for s in segments] == ["Liver tumor"] * 2 and len({s.tracking_uid for s in segments}) == 2
    assert dcmread(tracked).SegmentSequence[0].TrackingID == "Liver tumor 1"

    by_lesion = evaluate([LabeledSeries("S1", "CT", paths, tracked, ("Liver tumor",))], OracleModel())["CT"]
    assert by_lesion["true_lesions"] == 2 and by_lesion["lesion_sensitivity"] == 1.0  # the tumour was found
    assert by_lesion["true_lesion_parts"] == 3 and by_lesion["lesion_part_sensitivity"] == 0.6667
    assert by_lesion["mean_dice_detected_lesions"] < 1.0  # its satellite, missed, costs Dice
    untracked = write_ground_truth(tmp_path / "untracked.dcm", paths, {"Liver tumor": tumour | satellite | other})
    by_component = evaluate([LabeledSeries("S1", "CT", paths, untracked, ("Liver tumor",))], OracleModel())["CT"]
    assert by_component["true_lesions"] == 3 and by_component["lesion_sensitivity"] == 0.6667
    assert by_component["finding_accuracy"] == by_lesion["finding_accuracy"]  # slices are scored alike

    [slice_3] = [s for s in series_samples(paths, tracked, 64) if s.slice_index == 3]
    assert slice_3.labels == ("Liver tumor",) and slice_3.answer == "It is [SEG]. Liver tumor."  # one finding, both tumours
    assert slice_3.masks.shape == (1, 64, 64) and slice_3.masks[0, 5:12, 5:12].all() and slice_3.masks[0, 20:40, 22:40].all()


@pytest.mark.slow
def test_train_on_a_folder_registers_a_version_that_only_an_admin_activates(tmp_path, capsys, caplog):
    from dicom_node.cli import main
    from dicom_node.config import load_config
    from dicom_node.jobs import JobService
    from dicom_node.model_registry import SHIPPED_MODEL
    from tests.localpeers import write_node_config

    caplog.set_level(logging.DEBUG, logger="training")
    # Exports are often foldered by patient: "PID-0419"'s SEG is left without its series (a partial export)
    for patient_id in ("PID-0417", "PID-0418", "PID-0419"):
        voxels = np.full((4, 48, 48), -1000.0, np.float32)
        voxels[:, 4:44, 4:44] = 40.0
        mask = np.zeros(voxels.shape, bool)
        mask[1:3, 15:30, 15:30] = True
        voxels[mask] = 150.0
        paths = write_series(tmp_path / "data" / patient_id, voxels, SeriesHeader(patient_id, "CT"), 5.0, 5.0)
        write_ground_truth(tmp_path / "data" / patient_id / "seg.dcm", paths, {"Liver tumor": mask})
    for path in paths:
        path.unlink()
    config_path = write_node_config(tmp_path / "node", 11112, [], extra='\n[[routes]]\nname = "all"\nmodel = "active"\n')
    out = tmp_path / "model"
    assert main(["train", "--folder", str(tmp_path / "data"), "--steps", "2", "--out", str(out), "--version", "v-test",
                 "--mirror", "--min-lesion-slices", "CT=3", "--aligned-overlap", "CT=0.75", "--lesion-weight", "2", "--quiet",
                 "--config", str(config_path)]) == 0
    card = json.loads((out / "model_card.json").read_text())
    assert card["version"] == "v-test" and card["findings"] == ["Liver tumor"]
    assert (card["min_lesion_slices"], card["aligned_lesion_overlap"]) == ({"CT": 3}, {"CT": 0.75})  # the operating point
    assert card["metrics"]["training"]["subjects"] == 1 and card["metrics"]["CT"]["volumes"] == 1
    # --mirror: the subject's 4 slices and their mirrored copies trained; the model averages with the mirror
    assert card["metrics"]["training"]["slices"] == 8 and card["architecture"]["mirror"] is True
    assert card["metrics"]["training"]["lesion_weight"] == 2.0  # how it was trained, for whoever reproduces it
    assert (out / "model.safetensors").stat().st_size < 25 * 2**20
    # The card travels with the model: how to reproduce it, but not where the (patient-named) exports lay
    assert card["training_data"] == "folder 1: 2 labelled series" and str(tmp_path / "data") not in (out / "model_card.json").read_text()
    assert card["metrics"]["training"]["command"].startswith("dicom-node train --folder FOLDER1 --steps 2 --out ")
    printed = capsys.readouterr()
    assert "registered (not active" in printed.out and "training:" not in printed.err  # --quiet: no progress bar
    # A hospital's training subjects are its Patient IDs: the log says where training is, never whose series
    progress = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert any("series 1/1 (CT)" in m for m in progress) and any("evaluated series 1/1 (CT)" in m for m in progress)
    assert any("which is not in the folder; skipped" in m for m in progress)  # the orphaned SEG, said without its path
    assert not [m for m in progress if "PID-04" in m]
    assert any("PID-04" in r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG)  # for tracing

    # Fine-tuning the registered version: its weights, shape and operating point, and a record of where it started
    tuned = tmp_path / "tuned"
    assert main(["train", "--folder", str(tmp_path / "data"), "--steps", "1", "--start-from", "v-test", "--learning-rate", "1e-4",
                 "--out", str(tuned), "--version", "v-tuned", "--quiet", "--config", str(config_path)]) == 0
    tuned_card = json.loads((tuned / "model_card.json").read_text())
    record = tuned_card["metrics"]["training"]
    assert record["start_from"] == {"version": "v-test", "weights_sha256": card["weights_sha256"]} and record["learning_rate"] == 1e-4
    assert tuned_card["architecture"] == card["architecture"] and tuned_card["min_lesion_slices"] == {"CT": 3}
    assert tuned_card["weights_sha256"] != card["weights_sha256"]  # it trained
    capsys.readouterr()

    config = load_config(config_path)
    service = JobService(config)
    assert service.model_path(config.routes[0]) == SHIPPED_MODEL  # training never activates
    assert main(["model", "list", "--config", str(config_path)]) == 0
    listing = capsys.readouterr().out
    assert "v-test" in listing and "* shipped" in listing
    assert main(["model", "activate", "v-test", "--config", str(config_path)]) == 0
    assert service.model_path(config.routes[0]) == out.resolve()
    assert main(["model", "activate", "nothing", "--config", str(config_path)]) == 2
    assert main(["model", "activate", "shipped", "--config", str(config_path)]) == 0
    assert service.model_path(config.routes[0]) == SHIPPED_MODEL


def test_training_embeddings_are_read_from_the_cache_as_a_tensor_would_index(tmp_path):
    """The training set keeps its embeddings in the disk cache (2 MB a slice: 160 head MRIs held in memory
    were killed for memory on 24 GiB) and reads the rows a batch asks for: an int, a slice, an index array or
    list, in any order and with repeats, give what the cache's tensor gives; joined sets keep their order."""
    from inference.model.builtin import BuiltinModel
    from tests.conftest import tiny_card
    from training.cache import EmbeddingCache

    model = BuiltinModel.new(tiny_card())
    rng = np.random.default_rng(3)
    images = rng.uniform(0, 1, (3, 256, 256)).astype(np.float32)
    cache = EmbeddingCache(tmp_path / "cache", model)
    stored = cache.stored(images)
    assert len(stored) == 3 and all(p.is_file() for p in stored.paths)
    tensor = cache.get(images)
    assert tensor.dtype == torch.bfloat16 and tuple(tensor.shape) == (3, 256, 64, 64)
    assert not torch.equal(tensor[0], tensor[1])
    for index in (np.array([2, 0, 2]), [1, 0], np.int64(1), 2, slice(1, None), slice(0, 0)):
        assert torch.equal(stored[index], tensor[index]), index
    assert tuple(stored[[]].shape) == (0, 256, 64, 64)
    joined = stored + cache.stored(images[:1])
    assert len(joined) == 4 and torch.equal(joined[[3, 0]], tensor[[0, 0]])


def test_a_cache_write_that_fails_leaves_no_partial_embedding(tmp_path, monkeypatch):
    """A disk that fills during a long encoding run (a 160-subject run did) stops it with a clear error and no
    partial file, which a later run would otherwise have to tell from a whole one."""
    from inference.model.builtin import BuiltinModel
    from tests.conftest import tiny_card
    from training import cache as cache_module

    def short_write(tensor, path):
        Path(path).write_bytes(b"PK\x03\x04 part of a zip")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 832 vs 726")

    cache = cache_module.EmbeddingCache(tmp_path / "cache", BuiltinModel.new(tiny_card()))
    images = np.random.default_rng(4).uniform(0, 1, (2, 256, 256)).astype(np.float32)
    monkeypatch.setattr(cache_module.torch, "save", short_write)
    with pytest.raises(cache_module.CacheWriteError, match="is the disk full"):
        cache.stored(images)
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []
    monkeypatch.undo()
    assert all(p.is_file() for p in cache.stored(images).paths)  # the rerun writes them whole


def test_detail_stacks_give_each_slice_with_its_neighbours_holding_each_slice_once():
    """The detail branch's input, each slice stacked with its neighbours (the edge slice repeated past the ends
    of its series), gathered from the series' slices held once (stored as stacks, 120 head MRIs took 2.8 GB and
    twice that while joined): any rows give the stacks the explicit construction gives, joined sets keep their
    order without copying a series, and the mirrored set mirrors every stack."""
    from inference.model.detail import context_indices
    from training.detail_stacks import DetailStacks

    rng = np.random.default_rng(5)
    first, second = (rng.uniform(0, 1, (n, 256, 256)).astype(np.float32) for n in (5, 3))
    picked = ([4, 0, 2], [1, 2])
    for context in (1, 2):
        stacks = DetailStacks.joined([DetailStacks.of_series(v, p, context) for v, p in zip((first, second), picked)])
        expected = np.stack([v[context_indices(k, len(v), context)] for v, p in zip((first, second), picked) for k in p])
        assert len(stacks) == 5 and stacks.volumes[0] is first and stacks.volumes[1] is second
        for rows in (np.array([4, 0, 4]), [1, 3], slice(2, None), slice(0, 0)):
            got = stacks[rows]
            assert got.dtype == np.float32 and np.array_equal(got, expected[rows]), rows
        assert np.array_equal(stacks[3], expected[3]) and np.array_equal(stacks[0][-1], first[4])  # past the end: slice 4 again
        both = stacks + stacks.mirrored()
        assert len(both) == 10 and np.array_equal(both[[5, 0]], np.stack([expected[0][..., ::-1], expected[0]]))
