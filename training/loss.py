"""UniBiomed's loss: L = L_text + 2 * BCE + 0.5 * Dice, with teacher forcing, plus 2 * BCE on clear slices.

The answer is fed after the image tokens and the question; the text loss is the cross-entropy of the answer
tokens (and EOS). Each [SEG] in the answer yields its hidden state at the position where [SEG] is fed
(as at generation), which prompts the mask decoder; its mask is compared with the target mask.

A slice with no finding ("No findings.") still teaches the decoder: the [SEG] query of an answer started as
"It is [SEG]" must give an empty mask there. Without it the decoder only ever sees slices with a lesion and
finds one everywhere; with it the decoder can decide (GroundedConfig.decision = "decoder").

With ``presence`` the decoder's IoU output is a presence logit: BCE against 1 for every [SEG] of an answer
with findings, against 0 for the query of a clear slice (weight ``PRESENCE_WEIGHT``).

``lesion_weight`` weighs the lesion pixels of a finding's mask in its BCE (``pos_weight``): above 1 it
makes a missed lesion pixel cost more than a false one beside it, against masks that cover only part of a
large lesion (docs/model-history.md, "Where MR Dice is lost"). 1, the paper's loss, by default; clear slices are not affected.

With ``region_tokens`` the token after each [SEG] carries the region of that [SEG]'s true mask (teacher
forcing, as the answer's own tokens are).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from inference.model.detail import DetailFeatures
from inference.model.grounded import GroundedSegmenter
from inference.model.vocabulary import EOS, PAD, SEG, encode

TEXT_WEIGHT, BCE_WEIGHT, DICE_WEIGHT = 1.0, 2.0, 0.5
PRESENCE_WEIGHT = 1.0


@dataclass(frozen=True)
class LossParts:
    total: torch.Tensor
    text: float
    bce: float
    dice: float
    clear_bce: float = 0.0  # the empty-mask term of the clear slices
    presence: float = 0.0  # the presence term (GroundedConfig.presence)


@dataclass(frozen=True)
class TeacherForced:
    """The language model's outputs over given answers: position j of ``logits`` predicts answer token j;
    ``hidden`` at j is the last layer's state where answer token j is fed (a [SEG]'s state, at a [SEG])."""

    ids: torch.Tensor  # (n, length) answer tokens and EOS, padded
    valid: torch.Tensor  # (n, length) 1 where ``ids`` is not padding
    logits: torch.Tensor  # (n, length, vocabulary)
    hidden: torch.Tensor  # (n, length, hidden)


def teacher_forced(network: GroundedSegmenter, embeddings: torch.Tensor, question: str, answers: list[str],
                   masks: list[torch.Tensor]) -> TeacherForced:
    """One pass over the answers fed in whole, as generation would have fed them token by token (with
    ``region_tokens``, the token after each [SEG] carries the region of that [SEG]'s mask in ``masks``)."""
    prefix = network.prompt_embeddings(embeddings, question)  # (n, p, hidden)
    answer_ids = [encode(network.tokenizer, a) + [network.token_id(EOS)] for a in answers]
    length = max(len(ids) for ids in answer_ids)
    pad = network.token_id(PAD)
    ids = torch.tensor([a + [pad] * (length - len(a)) for a in answer_ids], device=embeddings.device)
    valid = torch.tensor([[1] * len(a) + [0] * (length - len(a)) for a in answer_ids], device=embeddings.device)
    tokens = network.language_model.get_input_embeddings()(ids)
    seg_positions = (ids == network.token_id(SEG)) & (valid == 1)
    if network.config.region_tokens and seg_positions.any():
        where = torch.nonzero(seg_positions)
        region = network.region_embeddings(embeddings[where[:, 0]], torch.cat([m for m in masks if len(m)]).to(embeddings.device))
        after = where[:, 1] + 1 < length
        added = torch.zeros_like(tokens)
        added[where[after, 0], where[after, 1] + 1] = region[after].to(tokens.dtype)
        tokens = tokens + added
    inputs = torch.cat([prefix, tokens], dim=1)
    attention = torch.cat([torch.ones(prefix.shape[:2], dtype=valid.dtype, device=valid.device), valid], dim=1)
    out = network.language_model(inputs_embeds=inputs, attention_mask=attention, output_hidden_states=True)
    p = prefix.shape[1]
    return TeacherForced(ids, valid, out.logits[:, p - 1:p - 1 + length].float(), out.hidden_states[-1][:, p:p + length].float())


def grounded_loss(network: GroundedSegmenter, embeddings: torch.Tensor, question: str, answers: list[str],
                  masks: list[torch.Tensor], detail: DetailFeatures | None = None, lesion_weight: float = 1.0) -> LossParts:
    """``embeddings`` (n, 256, 64, 64); ``answers`` n texts; ``masks`` n tensors (n_seg_i, 256, 256) in {0, 1};
    ``detail``: the detail branch's features of the n slices (models with one); ``lesion_weight``: the BCE weight
    of a finding's lesion pixels."""
    forced = teacher_forced(network, embeddings, question, answers, [m.float() for m in masks])
    ids, valid, logits = forced.ids, forced.valid, forced.logits
    seg_positions = (ids == network.token_id(SEG)) & (valid == 1)
    text = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.masked_fill(valid == 0, -100).reshape(-1), ignore_index=-100)
    total = TEXT_WEIGHT * text
    clear = [i for i, m in enumerate(masks) if not len(m)]
    clear_bce = torch.zeros((), device=embeddings.device)
    presence_logits, presence_targets = [], []
    if clear:
        logits, iou = network.decode_masks(embeddings[clear], network.query_states(embeddings[clear], question),
                                           None if detail is None else detail[clear])
        clear_bce = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits))
        total = total + BCE_WEIGHT * clear_bce
        presence_logits.append(iou)
        presence_targets.append(torch.zeros_like(iou))
    if seg_positions.any():
        hidden = forced.hidden[seg_positions]  # (m, hidden), in sample order
        owners = torch.nonzero(seg_positions)[:, 0]
        predicted, iou = network.decode_masks(embeddings[owners], hidden, None if detail is None else detail[owners])
        presence_logits.append(iou)
        presence_targets.append(torch.ones_like(iou))
    presence = torch.zeros((), device=embeddings.device)
    if network.config.presence and presence_logits:
        presence = F.binary_cross_entropy_with_logits(torch.cat(presence_logits), torch.cat(presence_targets))
        total = total + PRESENCE_WEIGHT * presence
    if not seg_positions.any():
        return LossParts(total, float(text.detach()), 0.0, 0.0, float(clear_bce.detach()), float(presence.detach()))
    target = torch.cat([m for m in masks if len(m)]).float().to(predicted.device)
    predicted = predicted.float()  # under bf16 autocast: the Dice sums 65,536 probabilities, in fp32
    bce = F.binary_cross_entropy_with_logits(predicted, target,
                                             pos_weight=torch.tensor(lesion_weight, device=predicted.device))
    probabilities = torch.sigmoid(predicted)
    dice = 1 - (2 * (probabilities * target).sum((1, 2)) + 1) / (probabilities.sum((1, 2)) + target.sum((1, 2)) + 1)
    total = total + BCE_WEIGHT * bce + DICE_WEIGHT * dice.mean()
    return LossParts(total, float(text.detach()), float(bce.detach()), float(dice.mean().detach()), float(clear_bce.detach()),
                     float(presence.detach()))
