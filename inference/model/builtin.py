"""The built-in model behind the GroundedModel protocol: loading, saving and interpreting slices.

An ensemble checkpoint (``ModelCard.members``) holds further sets of trained heads that share the one frozen
encoder: the encoder (98 % of a slice's cost) runs once, each set of heads answers the [SEG] query, and the
mask probabilities are averaged, as ``mirror`` averages a slice with its mirror. The slice is a finding where
the average draws ``min_mask_pixels``; the first set of heads (``model.safetensors``) then names it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from inference.model.card import CARD_FILE, WEIGHTS_FILE, EnsembleMember, ModelCard, sha256_of
from inference.model.detail import DetailFeatures
from inference.model.grounded import FROZEN_PREFIXES, TIED_OUTPUT, GroundedConfig, GroundedSegmenter, probability_logit
from inference.model.litemedsam import ArchitectureError, WeightsError, checked_weights, load_litemedsam
from inference.model.precision import EncoderPrecision, encoder_bf16
from inference.model.protocol import NO_FINDINGS, Answer, Interpretation, ModelScope, question_modality
from storage.files import write_text_durably

logger = logging.getLogger(__name__)


def pick_device(preferred: str = "auto") -> torch.device:
    """A GPU where present (or where asked for), else the CPU."""
    if preferred == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(preferred)


def mirror_images(images: np.ndarray) -> np.ndarray:
    """Slices or masks (their last axis runs left-right) mirrored left-right, contiguous (the encoder cache
    keys on their bytes)."""
    return np.ascontiguousarray(images[..., ::-1])


def average_logits(*logits: torch.Tensor) -> torch.Tensor:
    """The logit of the mean of the probabilities, so one threshold applies to the average as to each."""
    return torch.logit(sum(torch.sigmoid(l.float()) for l in logits) / len(logits), eps=1e-6)


def load_heads(network: GroundedSegmenter, weights_path: Path, sha256: str = "") -> None:
    """Load trained heads (everything but the frozen encoders) into ``network``, checking them against the
    SHA-256 their card records; heads of another architecture raise ArchitectureError."""
    checked_weights(weights_path, sha256)
    try:
        missing, unexpected = network.load_state_dict(load_file(weights_path), strict=False)
    except RuntimeError as exc:  # shapes that differ: another detail width, context or token grid
        raise ArchitectureError(f"{weights_path}: {str(exc).strip().splitlines()[-1].strip()}") from None
    missing = [k for k in missing if not k.startswith(FROZEN_PREFIXES) and k != TIED_OUTPUT]
    if missing or unexpected:  # parts that differ: a detail branch or not
        raise ArchitectureError(f"{weights_path}: missing {missing[:3]}, unexpected {unexpected[:3]}")


def trainable_weights(network: GroundedSegmenter, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """What a checkpoint stores of a network: its trained heads, floating-point ones as ``dtype``."""
    return {k: v.detach().cpu().to(dtype if v.is_floating_point() else v.dtype).contiguous()
            for k, v in network.trainable_state_dict().items()}


class BuiltinModel:
    """GroundedSegmenter + its card, answering the UniBiomed questions for batches of slices."""

    def __init__(self, network: GroundedSegmenter, card: ModelCard, device: torch.device | None = None,
                 precision: EncoderPrecision | str = EncoderPrecision.CARD) -> None:
        """``precision``: the frozen encoder's (``inference.model.precision``); by default as the card says
        the model was trained (``ModelCard.encoder_precision``)."""
        self.device = device or pick_device()
        self.network = network.to(self.device).eval()
        self.bf16 = encoder_bf16(card.encoder_precision, precision, self.device)
        # The frozen encoder runs channels-last (oneDNN). On 2 cores with AVX512-BF16: 0.70 s/slice in bf16
        # weights, against 0.86 (bf16 autocast, channels-last), 1.15 (autocast) and 2.4 (fp32); on 2 AMD Zen 3
        # cores (AVX2, no native bf16): 2.3 s in fp32, 13.9 s in bf16 (inference.model.precision).
        self.network.image_encoder.to(memory_format=torch.channels_last)
        if self.bf16:
            self.network.image_encoder.to(torch.bfloat16)
        self.card = card
        self.input_size = card.input_size
        self.scope = ModelScope(card.modalities, card.body_parts)
        self.version = card.version
        self.normalization = card.normalization
        self.reliability = card.reliability
        self.min_lesion_slices = card.min_lesion_slices
        self.aligned_lesion_overlap = card.aligned_lesion_overlap
        self.mask_threshold = card.mask_threshold  # per modality, or None: the architecture's (mask_logit)
        self.context_slices = network.config.context_slices  # neighbours each side the engine passes (2.5D)
        self.members: list[tuple[EnsembleMember, GroundedSegmenter]] = []  # further heads (add_member)
        self.timings: dict[str, float] = defaultdict(float)  # seconds per stage, for the benchmark
        self._compiled: Callable[[torch.Tensor], torch.Tensor] | None = None  # compile_encoder
        self._compile_failed = False  # a compile that failed is not tried again (training calls compile per series)
        # torch.compile's Dynamo is not thread-safe, and a node's job threads share this model: one at a time
        # compiles, runs the compiled encoder or falls back from it.
        self._compile_lock = threading.Lock()

    @classmethod
    def new(cls, card: ModelCard, pretrained_sam: bool = True, device: torch.device | None = None,
            precision: EncoderPrecision | str = EncoderPrecision.CARD) -> BuiltinModel:
        """A model with LiteMedSAM's pretrained encoder and decoder and freshly initialised heads."""
        config = GroundedConfig(**card.architecture)
        return cls(GroundedSegmenter(config, load_litemedsam(pretrained_sam)), card, device, precision)

    @classmethod
    def load(cls, folder: Path, device: torch.device | None = None,
             precision: EncoderPrecision | str = EncoderPrecision.CARD, card: ModelCard | None = None) -> BuiltinModel:
        """Load a checkpoint folder; the weights must match the SHA-256 in its card. ``card``: build the network
        from this card instead (fine-tuning: the folder's weights under a new version's operating point);
        weights that do not fit it raise ArchitectureError."""
        card_path, weights_path = folder / CARD_FILE, folder / WEIGHTS_FILE
        if not card_path.is_file() or not weights_path.is_file():
            raise WeightsError(f"{folder} is not a checkpoint ({CARD_FILE} and {WEIGHTS_FILE} expected)")
        own = ModelCard.from_json(card_path.read_text())
        model = cls.new(card or own, device=device, precision=precision)
        load_heads(model.network, weights_path, own.weights_sha256)
        for member in model.card.members:  # ``card`` (fine-tuning) names none: only the first heads are trained on
            model.add_member(member, folder / member.weights)
        return model

    def add_member(self, member: EnsembleMember, weights_path: Path) -> None:
        """Load an ensemble member's heads (checked against ``member.sha256``) beside the model's own, sharing
        its frozen encoders."""
        config = self.network.config
        if config.ensemble_refusal:
            raise ArchitectureError(config.ensemble_refusal)
        network = GroundedSegmenter(config, load_litemedsam(pretrained=False))
        network.image_encoder, network.prompt_encoder = self.network.image_encoder, self.network.prompt_encoder
        load_heads(network, weights_path, member.sha256)
        self.members.append((member, network.to(self.device).eval()))

    def save(self, folder: Path, dtype: torch.dtype = torch.float32) -> ModelCard:
        """Write the trainable weights (as ``dtype``: bf16 halves the file) and the card (with their SHA-256)."""
        folder.mkdir(parents=True, exist_ok=True)
        save_file(trainable_weights(self.network, dtype), folder / WEIGHTS_FILE, metadata={"format": "pt", "version": self.card.version})
        members = []
        for member, network in self.members:
            save_file(trainable_weights(network, dtype), folder / member.weights, metadata={"format": "pt", "version": member.version})
            members.append(dataclasses.replace(member, sha256=sha256_of(folder / member.weights)))
        self.card = dataclasses.replace(self.card, weights_sha256=sha256_of(folder / WEIGHTS_FILE), members=tuple(members))
        write_text_durably(folder / CARD_FILE, self.card.to_json())
        return self.card

    def encode(self, images: np.ndarray) -> torch.Tensor:
        """(n, size, size) -> (n, 256, 64, 64) float32 image embeddings (computed in the encoder's precision)."""
        start = time.perf_counter()
        batch = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(self.device)
        if self.bf16:
            batch = batch.to(torch.bfloat16)
        embeddings = self._encode_compiled(batch) if self._compiled is not None else None
        if embeddings is None:
            embeddings = self.network.encode_images(batch).float().contiguous()
        self.timings["encoder"] += time.perf_counter() - start
        return embeddings

    def compile_encoder(self) -> None:
        """Encode through ``torch.compile`` from now on, one slice at a time in the default memory format:
        on 2 AMD Zen 3 cores, fp32, 1.3 s/slice against 2.2 eager, after about a minute of compiling; for bulk
        encoding (the training cache) and, through ``prepare_compiled_encoder``, a node's fp32 encoder. The
        embeddings agree with eager ones to about 1e-5. Where compiling fails (no C++ compiler), encoding goes
        on eagerly, and later calls do not try again."""
        with self._compile_lock:
            if self._compiled is None and not self._compile_failed:
                encoder = self.network.image_encoder
                self._compiled = torch.compile(encoder.to(memory_format=torch.contiguous_format))

    def prepare_compiled_encoder(self) -> bool:
        """For a node: compile an fp32 encoder on the CPU and run it once, so that the compile (about a minute)
        is paid while the model loads, not by the first series. On 2 cores with AVX512-BF16: 0.77-0.83 s a
        slice against 1.4-2.1 eager. bf16 encoders (0.7-1.0 s eager, channels-last) and GPUs stay eager.
        Whether the compiled encoder is in use."""
        if self.bf16 or self.device.type != "cpu":
            return False
        self.compile_encoder()
        self.encode(np.zeros((1, self.input_size, self.input_size), np.float32))
        self.timings.clear()  # the compile is the load's, not the first series' encoding
        in_use = self._compiled is not None
        logger.info("encoder %s", "compiled (fp32, CPU)" if in_use else "eager: compiling failed")
        return in_use

    @torch.inference_mode()
    def _encode_compiled(self, batch: torch.Tensor) -> torch.Tensor | None:
        """The embeddings from the compiled encoder, or None where it failed or another thread's failure
        has just removed it (the caller encodes eagerly)."""
        with self._compile_lock:
            if self._compiled is None:
                return None
            try:
                return torch.cat([self._compiled(image[None, None].expand(-1, 3, -1, -1).contiguous()).float()
                                  for image in batch])
            except Exception as exc:  # noqa: BLE001 - torch.compile's failures are many (no compiler, unsupported op)
                # One line for the admin (a failed g++ run's traceback and command line fill a screen); the whole
                # of it at DEBUG for whoever must find out why.
                reason = (str(exc).strip().splitlines() or [""])[0][:200]
                logger.warning("the compiled encoder failed (%s: %s); encoding eagerly from now on", type(exc).__name__, reason)
                logger.debug("the compiled encoder's failure", exc_info=True)
                self._compiled, self._compile_failed = None, True
                self.network.image_encoder.to(memory_format=torch.channels_last)
                return None

    def detail_input(self, images: np.ndarray, context: np.ndarray | None = None) -> np.ndarray:
        """What the detail branch sees: (n, 2 * context_slices + 1, size, size), each slice between its
        neighbours (``context``, from the engine) or, for a model without neighbours, the slice alone."""
        if context is None:
            if self.context_slices:
                raise ValueError(f"this model sees {self.context_slices} neighbouring slice(s) each side: pass context")
            return images[:, None]
        if context.shape[:2] != (len(images), 2 * self.context_slices + 1):
            raise ValueError(f"context must be (n, {2 * self.context_slices + 1}, size, size), not {context.shape}")
        return context

    def detail(self, slices: np.ndarray | None) -> DetailFeatures | None:
        """The detail branch's features of ``detail_input`` slices (None for a model without the branch)."""
        if not self.network.config.detail_width or slices is None:
            return None
        start = time.perf_counter()
        features = self.network.detail_features(torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32)).to(self.device))
        self.timings["detail"] += time.perf_counter() - start
        return features

    @torch.inference_mode()
    def interpret(self, images: np.ndarray, question: str, samples: int = 0, temperature: float = 0.7,
                  seed: int = 0, context: np.ndarray | None = None) -> list[Interpretation]:
        """``context``: (n, 2 * context_slices + 1, size, size), slice k between its neighbours, for a model
        whose detail branch sees them (``context_slices``)."""
        slices = self.detail_input(images, context)
        embeddings = self.encode(images)
        mirrored = self.encode(mirror_images(images)) if self.network.config.mirror else None
        return self.interpret_embeddings(embeddings, question, samples, temperature, seed, mirrored, slices)

    @torch.inference_mode()
    def interpret_embeddings(self, embeddings: torch.Tensor, question: str, samples: int = 0,
                             temperature: float = 0.7, seed: int = 0, mirrored: torch.Tensor | None = None,
                             slices: np.ndarray | None = None) -> list[Interpretation]:
        """The greedy answer per slice; ``samples`` more at ``temperature`` for slices with a [SEG].
        ``mirrored``: the embeddings of the mirrored slices, where the model averages over both
        (``GroundedConfig.mirror``); ``slices``: the detail branch's input (``detail_input``)."""
        if self.network.config.mirror and mirrored is None:
            raise ValueError("this model averages each slice with its mirror: pass the mirrored embeddings")
        if self.network.config.detail_width and slices is None:
            raise ValueError("this model has a detail branch: pass its slices (detail_input)")
        detail = self.detail(slices)
        mirrored_detail = self.detail(mirror_images(slices)) if mirrored is not None and slices is not None else None
        greedy = self._answers(embeddings, question, 0.0, None, mirrored, detail, mirrored_detail, slices)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        results = []
        for i, answer in enumerate(greedy):
            sampled: tuple[Answer, ...] = ()
            if samples and len(answer.masks):
                repeated = embeddings[i:i + 1].expand(samples, -1, -1, -1)
                # The slice is known to have a finding: with the decoder deciding, its gate would only repeat
                # the greedy answer's, so the samples start from the answer's start as that one did.
                rows = None if detail is None else detail[[i] * samples]
                sampled = tuple(self._generated(repeated, question, temperature, generator, self._answer_start(), rows))
            results.append(Interpretation(answer, sampled))
        return results

    def _answers(self, embeddings: torch.Tensor, question: str, temperature: float,
                 generator: torch.Generator | None, mirrored: torch.Tensor | None = None,
                 detail: DetailFeatures | None = None, mirrored_detail: DetailFeatures | None = None,
                 slices: np.ndarray | None = None) -> list[Answer]:
        """One answer per slice, decided by the language model or by the mask decoder (GroundedConfig), the
        decoder's answer averaged over the mirror (``mirror``) or the ensemble members asked about the
        question's modality; ``slices``: the detail branch's input, for the members' own branches."""
        config = self.network.config
        if config.decision == "language":
            return self._generated(embeddings, question, temperature, generator, detail=detail)
        start = time.perf_counter()
        logits, iou = self.network.decode_masks(embeddings, self.network.query_states(embeddings, question), detail)
        views = [(logits, iou)]
        if mirrored is not None:
            other, other_iou = self.network.decode_masks(mirrored, self.network.query_states(mirrored, question),
                                                         mirrored_detail)
            views.append((other.flip(-1), other_iou))
        modality = question_modality(question)
        asked = [network for member, network in self.members if modality is None or modality in member.modalities]
        context = None  # the detail branches' input, made once for all members
        if asked and config.detail_width and slices is not None:
            context = torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32)).to(self.device)
        for network in asked:
            features = network.detail_features(context) if config.detail_width else None
            views.append(network.decode_masks(embeddings, network.query_states(embeddings, question), features))
        if len(views) > 1:
            logits = average_logits(*(l for l, _ in views))
            iou = sum(i.float() for _, i in views) / len(views)
        mask_logit = self.mask_logit(question)
        finding = self.network.mask_pixels(logits, mask_logit) >= config.min_mask_pixels
        if config.presence:
            finding &= self.network.mask_scores(iou) >= config.presence_threshold
        found = torch.nonzero(finding).flatten().tolist()
        self.timings["mask_decoder"] += time.perf_counter() - start
        empty = np.zeros((0, self.input_size, self.input_size), dtype=bool)
        answers = [Answer(NO_FINDINGS, empty, np.zeros(0, dtype=np.float32)) for _ in range(len(embeddings))]
        if found:
            generated = self._generated(embeddings[found], question, temperature, generator, self._answer_start(),
                                        None if detail is None else detail[found])
            for i, answer in zip(found, generated):
                answers[i] = answer
                if len(views) > 1:  # the first mask is the averaged one that made the slice a finding
                    answer.masks[0] = (logits[i] > mask_logit).cpu().numpy()
                    answer.scores[0] = float(self.network.mask_scores(iou[i:i + 1])[0])
                    answer.stability[0] = float(self.network.mask_stability(logits[i:i + 1], mask_logit)[0])
        return answers

    def mask_logit(self, question: str) -> float:
        """The decoder logit above which a pixel is in the mask, for the question's modality: the card's
        ``mask_threshold`` for it where it names one, else the architecture's."""
        value = self.mask_threshold
        threshold = value.get(question_modality(question) or "") if isinstance(value, dict) else value
        return self.network.config.mask_logit if threshold is None else probability_logit(threshold)

    def _answer_start(self) -> list[int] | None:
        """The tokens an answer with a finding is started with: "It is [SEG]" when the decoder decides."""
        return self.network.query_ids() if self.network.config.decision == "decoder" else None

    def _generated(self, embeddings: torch.Tensor, question: str, temperature: float,
                   generator: torch.Generator | None, start: list[int] | None = None,
                   detail: DetailFeatures | None = None) -> list[Answer]:
        start_time = time.perf_counter()
        generations = self.network.generate(embeddings, question, temperature, generator, start, detail)
        self.timings["language_model"] += time.perf_counter() - start_time
        start_time = time.perf_counter()
        owners = [i for i, g in enumerate(generations) for _ in range(len(g.seg_hidden))]
        masks = np.zeros((0, self.input_size, self.input_size), dtype=bool)
        scores = stability = np.zeros(0, dtype=np.float32)
        if owners:
            if all(g.mask_logits is not None for g in generations):  # decoded during generation
                logits, iou = torch.cat([g.mask_logits for g in generations]), torch.cat([g.iou for g in generations])
            else:
                hidden = torch.cat([g.seg_hidden for g in generations if len(g.seg_hidden)]).to(self.device)
                logits, iou = self.network.decode_masks(embeddings[owners], hidden, None if detail is None else detail[owners])
            mask_logit = self.mask_logit(question)
            masks, scores = (logits > mask_logit).cpu().numpy(), self.network.mask_scores(iou).cpu().numpy()
            stability = self.network.mask_stability(logits, mask_logit).cpu().numpy()
        self.timings["mask_decoder"] += time.perf_counter() - start_time
        answers, start = [], 0
        for g in generations:
            count = len(g.seg_hidden)
            answers.append(Answer(self.network.answer_text(g.token_ids), masks[start:start + count],
                                  scores[start:start + count], stability[start:start + count]))
            start += count
        return answers
