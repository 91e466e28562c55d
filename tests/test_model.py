"""The built-in grounded model: vocabulary, weights, checkpoints, and the whole chain learnt on a toy case."""

import json

import numpy as np
import pytest
import torch

from inference.model.builtin import BuiltinModel
from inference.model.card import ModelCard
from inference.model.grounded import GroundedConfig
from inference.model.litemedsam import LITEMEDSAM_SHA256, WeightsError, litemedsam_weights_path, verify_sha256
from inference.model.protocol import normalize_finding, parse_findings, recognition_question, segmentation_question
from inference.model.vocabulary import build_tokenizer, decode, encode

from tests.conftest import QUESTION, TOY_ANSWERS, decoder_checkpoint


def test_questions_follow_unibiomed():
    assert QUESTION == "Can you identify any abnormality within this CT image? Please respond with segmentation masks."
    assert segmentation_question("the liver", "MR") == "Please segment the liver in the MRI image."


def test_answers_parse_into_one_finding_per_seg():
    assert parse_findings("It is [SEG]. Liver tumor.") == ["Liver tumor"]
    assert parse_findings("It is [SEG]. liver  TUMOR . It is [SEG]. Kidney tumor.") == ["Liver tumor", "Kidney tumor"]
    assert parse_findings("No findings.") == [] and parse_findings("It is [SEG].") == [""]
    assert normalize_finding(" Lung-nodule ") == "Lung nodule"


def test_closed_vocabulary_round_trips_answers_and_marks_unknown_words():
    tokenizer = build_tokenizer()
    for text in ("It is [SEG]. Liver tumor.", "No findings.", "It is [SEG]. Brain tumor. It is [SEG]. Lung nodule."):
        assert decode(tokenizer, encode(tokenizer, text)) == text
    assert "[UNK]" in decode(tokenizer, encode(tokenizer, "Please segment the pancreas"))
    assert build_tokenizer().get_vocab() == tokenizer.get_vocab()  # deterministic


def test_litemedsam_weights_are_verified(tmp_path):
    verify_sha256(litemedsam_weights_path(), LITEMEDSAM_SHA256)
    impostor = tmp_path / "lite_medsam.pth"
    original = litemedsam_weights_path().read_bytes()
    impostor.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))  # one bit pattern changed
    with pytest.raises(WeightsError, match="SHA-256"):
        verify_sha256(impostor, LITEMEDSAM_SHA256)


def test_loss_has_the_three_terms_and_falls(trained):
    """L = L_text + 2·BCE + 0.5·Dice (plus 2·BCE of the clear slice's empty mask): the terms weighted as the
    paper weights them, each large for an untrained model and each far smaller once the toy has learnt."""
    from training.loss import grounded_loss

    model, _, embeddings, targets, learnt = trained
    with torch.random.fork_rng():
        torch.manual_seed(1)
        fresh = BuiltinModel.new(model.card)
    with torch.no_grad():
        before = grounded_loss(fresh.network, embeddings, QUESTION, TOY_ANSWERS, [torch.from_numpy(t).float() for t in targets])
    assert float(before.total) == pytest.approx(before.text + 2 * before.bce + 0.5 * before.dice + 2 * before.clear_bce, rel=1e-5)
    assert before.text > 1 and before.bce > 0.1 and before.dice > 0.5
    assert learnt.text < before.text / 20 and learnt.bce < before.bce / 20 and learnt.dice < before.dice / 20


def test_lesion_weight_multiplies_the_cost_of_lesion_pixels_alone(trained):
    """``lesion_weight`` W (the mask BCE's pos_weight): the BCE is its background part plus W times its lesion
    part, so a missed lesion pixel costs W times what it did; text and the clear slice's term are untouched."""
    from training.loss import grounded_loss

    model, _, embeddings, targets, _ = trained
    masks = [torch.from_numpy(t).float() for t in targets]
    with torch.no_grad():
        parts = {w: grounded_loss(model.network, embeddings, QUESTION, TOY_ANSWERS, masks, lesion_weight=w) for w in (0.0, 1.0, 3.0)}
    background, lesion = parts[0.0].bce, parts[1.0].bce - parts[0.0].bce
    assert lesion > 0 and parts[3.0].bce == pytest.approx(background + 3 * lesion, rel=1e-4)
    assert parts[3.0].text == parts[1.0].text and parts[3.0].clear_bce == parts[1.0].clear_bce
    assert parts[3.0].dice == parts[1.0].dice


def test_the_mask_decoder_decides_when_the_card_says_so(trained, tmp_path):
    """decision = "decoder": the [SEG] query's mask decides; the language model names what it found."""
    model, images, _, targets, _ = trained
    card_path = decoder_checkpoint(model, tmp_path / "ckpt") / "model_card.json"
    card = json.loads(card_path.read_text())
    gated = BuiltinModel.load(tmp_path / "ckpt")
    results = gated.interpret(images, QUESTION, samples=2)
    assert [r.answer.text for r in results] == ["It is [SEG]. Lung nodule. It is [SEG]. Kidney tumor.", "No findings."]
    for predicted, expected in zip(results[0].answer.masks, targets[0]):
        assert (predicted & expected).sum() / (predicted | expected).sum() > 0.8
    assert results[1].answer.masks.shape == (0, 256, 256) and len(results[0].samples) == 2
    # A much looser threshold: the same findings, larger masks (this toy's logits are steep at the box edges:
    # on AMD Zen 3, 0.02 added no pixel, 1e-4 added 143)
    card["architecture"]["mask_threshold"] = 1e-4
    card_path.write_text(json.dumps(card))
    loose = BuiltinModel.load(tmp_path / "ckpt").interpret(images, QUESTION)
    assert [r.answer.text for r in loose] == [r.answer.text for r in results]
    assert (loose[0].answer.masks >= results[0].answer.masks).all() and loose[0].answer.masks.sum() > results[0].answer.masks.sum()
    card["architecture"]["mask_threshold"] = 0.5
    card["architecture"]["min_mask_pixels"] = 256 * 256  # no mask is that large: nothing is a finding
    card_path.write_text(json.dumps(card))
    blind = BuiltinModel.load(tmp_path / "ckpt")
    assert [r.answer.text for r in blind.interpret(images, QUESTION)] == ["No findings.", "No findings."]


def test_the_presence_head_tells_a_slice_with_a_finding_from_a_clear_one(trained_presence, tmp_path):
    """With ``presence`` the decoder's IoU head learns the probability that the [SEG] query's finding is on the
    slice at all, and the gate requires it, so a finding does not rest on a count of pixels that a stray blob
    can reach."""
    model, images, embeddings, _, parts = trained_presence
    network = model.network
    with torch.no_grad():
        _, iou = network.decode_masks(embeddings, network.query_states(embeddings, QUESTION))
    presence = network.mask_scores(iou)
    assert presence[0] > 0.9 and presence[1] < 0.1 and parts.presence < 0.1
    model.save(tmp_path / "ckpt")
    card_path = tmp_path / "ckpt" / "model_card.json"
    card = json.loads(card_path.read_text())
    card["architecture"] |= {"decision": "decoder", "min_mask_pixels": 1}
    card_path.write_text(json.dumps(card))
    results = BuiltinModel.load(tmp_path / "ckpt").interpret(images, QUESTION)
    assert [r.answer.text for r in results] == ["It is [SEG]. Lung nodule. It is [SEG]. Kidney tumor.", "No findings."]
    assert np.allclose(results[0].answer.scores, presence[0].item(), atol=0.02)  # the score reported is the presence
    # each mask has its stability score, that of its own decoder logits: what reliability rests on
    with torch.no_grad():
        logits, _ = network.decode_masks(embeddings[[0, 0]], network.generate(embeddings[:1], QUESTION, 0.0, None)[0].seg_hidden)
    assert np.allclose(results[0].answer.stability, network.mask_stability(logits, network.config.mask_logit).numpy(), atol=1e-4)
    assert len(results[1].answer.stability) == 0
    # Above the finding's own presence, its slice has none, whatever its mask.
    card["architecture"]["presence_threshold"] = (float(results[0].answer.scores[0]) + 1) / 2
    card_path.write_text(json.dumps(card))
    doubtful = BuiltinModel.load(tmp_path / "ckpt")
    assert [r.answer.text for r in doubtful.interpret(images, QUESTION)] == ["No findings.", "No findings."]


def test_mirror_averaging_answers_a_slice_and_its_mirror_alike(trained, tmp_path):
    """With ``mirror`` the [SEG] query's mask is averaged over the slice and its mirror: whether a slice has a
    finding no longer depends on which way round it lies, and the mask drawn on the mirrored slice is the
    mirror of the one drawn on the slice."""
    model, images, _, targets, _ = trained
    model.save(tmp_path / "ckpt")
    card_path = tmp_path / "ckpt" / "model_card.json"
    card = json.loads(card_path.read_text())
    # The toy model never saw a mirrored slice, so its mirrored view is weak: at 0.25 the average keeps what one
    # confident view sees.
    card["architecture"] |= {"decision": "decoder", "min_mask_pixels": 30, "mirror": True, "mask_threshold": 0.25}
    card_path.write_text(json.dumps(card))
    averaging = BuiltinModel.load(tmp_path / "ckpt")
    flipped = np.ascontiguousarray(images[:, :, ::-1])
    plain, mirrored = averaging.interpret(images, QUESTION), averaging.interpret(flipped, QUESTION)
    assert [r.answer.text == "No findings." for r in plain] == [r.answer.text == "No findings." for r in mirrored] == [False, True]
    first, first_mirrored = plain[0].answer.masks[0], mirrored[0].answer.masks[0]
    assert first.sum() >= 30 and (first != first_mirrored[:, ::-1]).sum() <= 0.01 * first.sum()
    network = averaging.network  # the first mask is the average the gate saw, not one view's
    with torch.no_grad():
        views = [averaging.encode(images[:1]), averaging.encode(flipped[:1])]
        a, b = (network.decode_masks(e, network.query_states(e, QUESTION))[0][0] for e in views)
    expected = ((torch.sigmoid(a) + torch.sigmoid(b.flip(-1))) / 2 > 0.25).numpy()
    assert (first == expected).mean() > 0.999
    with pytest.raises(ValueError, match="mirror"):
        averaging.interpret_embeddings(views[0], QUESTION)


def test_a_mask_threshold_per_modality_draws_that_modalitys_masks_alone(trained, tmp_path):
    """The card's ``mask_threshold`` for one modality loosens the masks (and the finding decision) of questions
    about it; another modality's answers stay at the architecture's threshold."""
    model, images, _, _, _ = trained
    card_path = decoder_checkpoint(model, tmp_path / "ckpt") / "model_card.json"
    card = json.loads(card_path.read_text())
    plain = BuiltinModel.load(tmp_path / "ckpt").interpret(images, QUESTION)  # QUESTION asks about CT
    card["architecture"]["mask_threshold"] = 1e-4
    card_path.write_text(json.dumps(card))
    loose = BuiltinModel.load(tmp_path / "ckpt").interpret(images, QUESTION)
    assert loose[0].answer.masks.sum() > plain[0].answer.masks.sum()  # the toy's masks do grow at 1e-4

    card["architecture"]["mask_threshold"] = 0.5
    for named, expected in (("MR", plain), ("CT", loose)):
        card_path.write_text(json.dumps(card | {"mask_threshold": {named: 1e-4}}))
        results = BuiltinModel.load(tmp_path / "ckpt").interpret(images, QUESTION)
        assert [r.answer.text for r in results] == [r.answer.text for r in expected]
        assert all((a.answer.masks == b.answer.masks).all() for a, b in zip(results, expected)), named


@pytest.mark.parametrize("threshold", [0, 1, {"MR": 1.0}, {"CT": "0.4"}])
def test_a_card_refuses_a_mask_threshold_outside_0_to_1(threshold):
    from tests.conftest import tiny_card

    with pytest.raises(ValueError, match="mask_threshold"):
        tiny_card(mask_threshold=threshold)
    card = tiny_card(mask_threshold={"MR": 0.4})
    assert ModelCard.from_json(card.to_json()).mask_threshold == {"MR": 0.4}  # the card keeps the point


@pytest.mark.parametrize("operating_point", [0, {"CT": 2, "MR": 0}, {"CT": "2"}])
def test_a_card_refuses_an_impossible_operating_point(operating_point):
    from tests.conftest import tiny_card

    with pytest.raises(ValueError, match="min_lesion_slices"):
        tiny_card(min_lesion_slices=operating_point)
    assert tiny_card(min_lesion_slices={"CT": 2, "MR": 3}).min_lesion_slices == {"CT": 2, "MR": 3}


@pytest.mark.parametrize("overlap", [0, 1.5, {"CT": -0.2}, {"CT": "0.9"}])
def test_a_card_refuses_an_aligned_overlap_outside_0_to_1(overlap):
    from inference.model.card import ModelCard
    from tests.conftest import tiny_card

    with pytest.raises(ValueError, match="aligned_lesion_overlap"):
        tiny_card(aligned_lesion_overlap=overlap)
    card = tiny_card(min_lesion_slices={"CT": 3}, aligned_lesion_overlap={"CT": 0.9})
    assert ModelCard.from_json(card.to_json()).aligned_lesion_overlap == {"CT": 0.9}  # the card keeps the point


@pytest.mark.parametrize("change", [{"decision": "vote"}, {"min_mask_pixels": 0}, {"mask_threshold": 0.0}, {"mask_threshold": 1.0},
                                    {"presence_threshold": 1.0}, {"presence_threshold": -0.1}, {"mirror": True},
                                    {"detail_width": 6}, {"detail_width": -4}, {"context_slices": 1},
                                    {"detail_width": 8, "context_slices": -1}])
def test_an_unknown_decision_rule_is_refused(change):
    with pytest.raises(ValueError):
        GroundedConfig(**change)


def test_region_tokens_feed_generation_what_training_feeds():
    """With region tokens the token after each [SEG] carries its mask's region: generation (token by token,
    decoding each mask as its [SEG] state appears) and the teacher-forced pass of training must see the same
    inputs, or the label the model learnt to read from the region is not the one it reads when it answers."""
    from tests.conftest import TINY, tiny_card
    from training.loss import teacher_forced

    torch.manual_seed(0)
    network = BuiltinModel.new(tiny_card(architecture=TINY | {"decision": "decoder", "region_tokens": True})).network.eval()
    embeddings = torch.randn(2, 256, 64, 64)
    start = network.query_ids()
    states: list[torch.Tensor] = []
    hook = network.language_model.model.norm.register_forward_hook(lambda module, args, out: states.append(out.float()))
    try:
        generations = network.generate(embeddings, QUESTION, start=start)
    finally:
        hook.remove()
    generated_states = torch.cat(states, dim=1)  # every fed position: image tokens, question, answer
    with torch.no_grad():
        masks = [torch.sigmoid(g.mask_logits) for g in generations]
        forced = teacher_forced(network, embeddings, QUESTION, [network.answer_text(g.token_ids) for g in generations], masks)
        blank = teacher_forced(network, embeddings, QUESTION, [network.answer_text(g.token_ids) for g in generations],
                               [torch.zeros_like(m) for m in masks])
    prefix = network.prompt_embeddings(embeddings, QUESTION).shape[1]
    for i, generation in enumerate(generations):
        count = len(generation.token_ids)
        assert count > len(start) + 1 and forced.ids[i, :count].tolist() == generation.token_ids
        # generation feeds its last token without a next one; the pass of training sees all of them
        fed = generated_states[i, prefix:prefix + count - 1]
        torch.testing.assert_close(forced.hidden[i, :count - 1], fed, atol=2e-4, rtol=1e-3)
        after_seg = len(start)  # the position after the forced start's [SEG]: it holds the region
        assert not torch.allclose(blank.hidden[i, after_seg], fed[after_seg], atol=1e-3)
        torch.testing.assert_close(blank.hidden[i, :after_seg], fed[:after_seg], atol=2e-4, rtol=1e-3)


def test_seg_hidden_state_prompts_one_mask_per_seg(trained):
    model, images, _, targets, _ = trained
    results = model.interpret(images, QUESTION, samples=3, seed=1)
    assert [r.answer.text for r in results] == ["It is [SEG]. Lung nodule. It is [SEG]. Kidney tumor.", "No findings."]
    assert results[0].answer.findings == ["Lung nodule", "Kidney tumor"]
    for result, target in zip(results, targets):
        assert result.answer.masks.shape == target.shape
        for predicted, expected in zip(result.answer.masks, target):
            assert (predicted & expected).sum() / (predicted | expected).sum() > 0.8
        assert result.answer.scores.shape == (len(target),)
    assert len(results[0].samples) == 3 and results[1].samples == ()


def test_checkpoint_round_trip_and_tamper_check(trained, tmp_path):
    model, images, _, _, _ = trained
    card = model.save(tmp_path / "ckpt")
    assert card.weights_sha256 and (tmp_path / "ckpt" / "model.safetensors").stat().st_size < 25 * 2**20
    loaded = BuiltinModel.load(tmp_path / "ckpt")
    assert loaded.card == card and loaded.scope.covers("MR") and not loaded.scope.covers("US")
    original, again = model.interpret(images, QUESTION), loaded.interpret(images, QUESTION)
    for a, b in zip(original, again):
        assert a.answer.text == b.answer.text and np.array_equal(a.answer.masks, b.answer.masks)
    weights = tmp_path / "ckpt" / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[:-1] + bytes([raw[-1] ^ 0xFF]))
    with pytest.raises(WeightsError, match="SHA-256"):
        BuiltinModel.load(tmp_path / "ckpt")


def test_a_new_detail_branch_leaves_litemedsams_decoder_as_it_was():
    """The detail branch's outputs start at zero, so a new model decodes exactly as SAM's own MaskDecoder
    (whose single-mask path our fused decoder re-implements): training starts from LiteMedSAM's decoder."""
    from tests.conftest import TINY, tiny_card

    torch.manual_seed(0)
    network = BuiltinModel.new(tiny_card(architecture=TINY | {"detail_width": 8, "context_slices": 1})).network.eval()
    embeddings, hidden = torch.randn(3, 256, 64, 64), torch.randn(3, 64)
    with torch.no_grad():
        plain_logits, plain_iou = network.decode_masks(embeddings, hidden)
        detail = network.detail_features(torch.rand(3, 3, 256, 256))
        logits, iou = network.decode_masks(embeddings, hidden, detail)
        assert detail.dense.abs().max() == 0 and detail.fine.abs().max() == 0
        torch.testing.assert_close(logits, plain_logits, atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(iou, plain_iou, atol=1e-4, rtol=1e-4)
        network.detail.to_fine[-1].bias.data.fill_(0.1)  # and the fine features do reach the mask
        assert not torch.allclose(network.decode_masks(embeddings, hidden, network.detail_features(torch.rand(3, 3, 256, 256)))[0],
                                  plain_logits, atol=1e-3)


def test_a_2_5d_model_finds_its_lesions_through_the_engine_and_keeps_them_in_its_checkpoint(trained_detail, tmp_path):
    """A model whose detail branch sees each slice between its neighbours, through the node's engine (which
    passes those neighbours) and after a save and load (the branch's weights are in the checkpoint)."""
    from inference.engine import EngineConfig, interpret_volume
    from inference.slicing import SliceRef, Volume

    model, images, _, targets, _, stacks = trained_detail
    window = model.normalization.ct_window
    hu = window[0] - window[1] / 2 + images * window[1]
    volume = Volume(hu.astype(np.float32), np.zeros(3), (1.0, 1.0, 2.0), np.eye(3), np.array([0.0, 2.0]), "1.2", "CT",
                    "1.2.6", [SliceRef(f"1.2.6.{k}") for k in range(2)])
    result = interpret_volume(volume, model, EngineConfig(batch_size=2))
    assert sorted(lesion.label for lesion in result.lesions) == ["Kidney tumor", "Lung nodule"]  # one each
    by_label = {lesion.label: lesion for lesion in result.lesions}
    for index, label in enumerate(["Lung nodule", "Kidney tumor"]):
        lesion, truth = by_label[label], targets[0][index]
        assert lesion.slice_range == (0, 0)
        assert (lesion.mask[0] & truth).sum() / (lesion.mask[0] | truth).sum() > 0.8

    model.save(tmp_path / "ckpt")
    loaded = BuiltinModel.load(tmp_path / "ckpt")
    assert loaded.context_slices == 1
    before, after = model.interpret(images, QUESTION, context=stacks), loaded.interpret(images, QUESTION, context=stacks)
    assert [r.answer.text for r in after] == [r.answer.text for r in before] == [
        "It is [SEG]. Lung nodule. It is [SEG]. Kidney tumor.", "No findings."]
    for a, b in zip(before[0].answer.masks, after[0].answer.masks):
        assert (a ^ b).sum() <= 0.01 * a.sum()  # the same masks, but for the bf16 rounding of saved weights
    with pytest.raises(ValueError, match="neighbouring"):
        loaded.interpret(images, QUESTION)


def test_a_failed_compile_encodes_eagerly_and_is_not_tried_again(monkeypatch, caplog):
    """Where torch.compile's encoder fails (no C++ compiler, say), encoding goes on eagerly with the same
    embeddings, and the training cache's next call to compile_encoder does not pay for a second failure. The
    warning names the reason in one line; the traceback goes to the debug log."""
    import logging

    from tests.conftest import tiny_card

    model = BuiltinModel.new(tiny_card())
    images = np.random.default_rng(0).uniform(0, 1, (1, 256, 256)).astype(np.float32)
    eager = model.encode(images)
    compiles = []

    def failing(module):  # type: ignore[no-untyped-def]
        compiles.append(module)

        def run(x):  # type: ignore[no-untyped-def]
            raise RuntimeError("no C++ compiler")
        return run

    monkeypatch.setattr(torch, "compile", failing)
    model.compile_encoder()
    with caplog.at_level(logging.DEBUG, logger="inference.model.builtin"):
        torch.testing.assert_close(model.encode(images), eager)
    [warning] = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.getMessage() == "the compiled encoder failed (RuntimeError: no C++ compiler); encoding eagerly from now on"
    assert warning.exc_info is None and any(r.exc_info for r in caplog.records if r.levelno == logging.DEBUG)
    model.compile_encoder()
    assert len(compiles) == 1
    torch.testing.assert_close(model.encode(images), eager)
