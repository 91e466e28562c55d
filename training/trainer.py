"""The trainer: frozen encoder (cached outputs), trainable projector, language model, [SEG] MLP and mask
decoder, the paper's loss (L_text + 2 BCE + 0.5 Dice), resumable checkpoints, fixed seeds.

Batches hold one modality (the question names it) and about ``positive_fraction`` slices with a finding.
With ``hard_negative_steps`` the schedule has a second, short phase after ``steps``: every clear training
slice is scored once (``training.hard_negatives``) and part of each batch's clear slices is drawn from those
on which the model still draws a lesion, at a restarted, lower learning rate. With ``hard_negative_cycles``
the phase is that many equal cycles, each restarting the rate and mining again from the weights at its
start; with ``average_cycles`` the final weights are the mean of the weights at each cycle's end (snapshot
averaging: each cycle ends at a low rate in a different point of the same basin, and their mean is less
noisy than any one of them).

Every ``checkpoint_every`` steps the trainable weights, the optimiser, the schedule, the step and the random
states go to ``state.pt`` in the output folder (atomically); ``resume`` continues from there exactly.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from inference.model.builtin import BuiltinModel
from inference.model.precision import native_bf16
from inference.model.protocol import recognition_question
from storage.files import replace_durably
from training.cache import StoredEmbeddings
from training.dataset import SliceSample
from training.detail_stacks import DetailStacks
from training.hard_negatives import hard_negatives
from training.loss import grounded_loss

logger = logging.getLogger(__name__)
STATE_FILE = "state.pt"


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 600  # the shipped model's; longer over-fitted the language model's decision (docs/model-history.md)
    batch_size: int = 8
    positive_fraction: float = 0.35
    learning_rate: float = 1e-3
    decoder_learning_rate: float = 2e-4  # the mask decoder starts from LiteMedSAM's: move it gently
    weight_decay: float = 0.05
    warmup_steps: int = 50
    checkpoint_every: int = 100
    seed: int = 0
    augment: bool = True  # intensity augmentation of the detail branch's input (models with one; augment_intensity)
    # bf16 autocast of the trainable parts' forward and backward (weights and optimiser stay fp32): on 2 cores
    # with AVX512-BF16, 2.1 s a step of a detail-branch model against 3.2 in fp32; on a GPU, the usual choice.
    # Off by default: where bf16 is emulated (AVX2-only CPUs) it is several times slower, not faster.
    autocast: bool = False
    # Hard negatives (training.hard_negatives): steps after ``steps`` in which ``hard_negative_fraction`` of a
    # batch's clear slices come from those whose query mask still has ``hard_negative_pixels`` or more.
    hard_negative_steps: int = 0
    hard_negative_fraction: float = 0.5
    hard_negative_pixels: int = 5
    hard_negative_learning_rate: float = 0.2  # the phase restarts at this fraction of the learning rates
    hard_negative_cycles: int = 1  # the phase as this many equal cosine cycles, each restarted and mined again
    average_cycles: bool = False  # the final weights: the mean of the weights at each cycle's end
    lesion_weight: float = 1.0  # BCE weight of a finding's lesion pixels (training.loss); 1: the paper's loss
    # Channel dropout on the cached encoder features in training: each slice's features come from one frozen
    # encoding, the same at every step, which the heads can learn by heart (on MR, held-out Dice 0.85 against
    # 0.92 on the training subjects; docs/model-history.md). 0: none.
    feature_dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.hard_negative_steps < 0:
            raise ValueError("steps must be at least 1 and hard_negative_steps at least 0")
        if not 0 <= self.hard_negative_fraction <= 1 or not 0 < self.hard_negative_learning_rate <= 1:
            raise ValueError("hard_negative_fraction must lie in [0, 1] and hard_negative_learning_rate in (0, 1]")
        if self.hard_negative_pixels < 1:
            raise ValueError("hard_negative_pixels must be at least 1")
        if self.hard_negative_cycles < 1 or self.hard_negative_steps % self.hard_negative_cycles:
            raise ValueError(f"hard_negative_steps ({self.hard_negative_steps}) must be a multiple of "
                             f"hard_negative_cycles ({self.hard_negative_cycles}), which must be at least 1")
        if not (self.learning_rate > 0 and self.decoder_learning_rate > 0):  # also refuses NaN
            raise ValueError(f"learning_rate must be positive, not {self.learning_rate} (decoder {self.decoder_learning_rate})")
        if not 0 <= self.feature_dropout < 1:  # also refuses NaN
            raise ValueError(f"feature_dropout must be at least 0 and below 1, not {self.feature_dropout}")
        if not self.lesion_weight > 0:  # also refuses NaN
            raise ValueError(f"lesion_weight must be positive, not {self.lesion_weight}")
        if self.average_cycles and not self.hard_negative_steps:
            raise ValueError("average_cycles averages the ends of the hard-negative cycles: it needs hard_negative_steps")

    @property
    def total_steps(self) -> int:
        return self.steps + self.hard_negative_steps

    @property
    def cycle_steps(self) -> int:
        return max(self.hard_negative_steps // self.hard_negative_cycles, 1)

    def cycle_start(self, step: int) -> bool:
        """Whether ``step`` (0-based) starts a hard-negative cycle, which is also where the one before it ends."""
        return step >= self.steps and (step - self.steps) % self.cycle_steps == 0


@dataclass
class TrainingSet:
    """Samples with their cached embeddings (bf16, on the CPU; read from the disk cache batch by batch)."""

    samples: list[SliceSample]
    embeddings: StoredEmbeddings | torch.Tensor  # (n, 256, 64, 64) when indexed
    detail_inputs: DetailStacks | None = None  # (n, 2 * context + 1, size, size) float32 when indexed: the detail branch's input

    def indices(self, modality: str, positive: bool) -> np.ndarray:
        return np.array([i for i, s in enumerate(self.samples) if s.modality == modality and bool(s.labels) == positive], int)


def augment_intensity(slices: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(n, c, size, size) in [0, 1] -> the same with a random gamma (0.75-1.33), contrast (0.85-1.15),
    brightness (+-0.05) and Gaussian noise (sigma up to 0.03) per sample, its neighbours alike. The encoder's
    cached embeddings cannot follow a change of the slice; the detail branch can, and should not learn one
    scanner's grey levels from 30 subjects."""
    n = slices.shape[0]
    gamma = np.exp(rng.uniform(np.log(0.75), np.log(1.33), n)).astype(np.float32)
    contrast = rng.uniform(0.85, 1.15, n).astype(np.float32)
    shift = rng.uniform(-0.05, 0.05, n).astype(np.float32)
    sigma = rng.uniform(0.0, 0.03, n).astype(np.float32)
    noise = rng.standard_normal(slices.shape, dtype=np.float32)
    shape = (n,) + (1,) * (slices.ndim - 1)
    out = np.clip(slices, 0.0, 1.0) ** gamma.reshape(shape)
    out = out * contrast.reshape(shape) + shift.reshape(shape) + sigma.reshape(shape) * noise
    return np.clip(out, 0.0, 1.0).astype(np.float32)


class Trainer:
    def __init__(self, model: BuiltinModel, data: TrainingSet, config: TrainConfig, out: Path) -> None:
        self.model, self.data, self.config, self.out = model, data, config, out
        network = model.network
        heads = [p for n, p in network.named_parameters() if p.requires_grad and not n.startswith("mask_decoder")]
        self.optimizer = torch.optim.AdamW([
            {"params": heads, "lr": config.learning_rate},
            {"params": [p for p in network.mask_decoder.parameters() if p.requires_grad], "lr": config.decoder_learning_rate},
        ], weight_decay=config.weight_decay)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._factor)
        self.step = 0
        self.rng = np.random.default_rng(config.seed)
        torch.manual_seed(config.seed)
        self.modalities = sorted({s.modality for s in data.samples})
        self.pools = {(m, p): data.indices(m, p) for m in self.modalities for p in (True, False)}
        self.history: list[dict] = []
        self.hard: dict[str, np.ndarray] | None = None  # modality -> hard clear slices, once mined
        self.average: dict[str, torch.Tensor] | None = None  # sum of the weights at the cycles' ends so far
        self.averaged = 0  # how many ends that sum holds
        if config.autocast and not native_bf16(model.device):
            logger.warning("bf16 autocast on %s, which has no native bf16: training will be several times slower", model.device)

    def _factor(self, step: int) -> float:
        if step >= self.config.steps:  # the hard-negative phase: short cosines from a lower restart
            progress = ((step - self.config.steps) % self.config.cycle_steps) / self.config.cycle_steps
            start = self.config.hard_negative_learning_rate
            return 0.05 + (start - 0.05) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if step < self.config.warmup_steps:
            return (step + 1) / self.config.warmup_steps
        progress = (step - self.config.warmup_steps) / max(self.config.steps - self.config.warmup_steps, 1)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))

    def resume(self) -> bool:
        """Continue from ``state.pt`` in the output folder, if there is one."""
        path = self.out / STATE_FILE
        if not path.is_file():
            logger.info("nothing to resume in %s (no %s): starting at step 0", self.out, STATE_FILE)
            return False
        state = torch.load(path, weights_only=False)
        self.model.network.load_state_dict(state["weights"], strict=False)
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.step, self.history = state["step"], state["history"]
        self.hard = {m: np.asarray(v, int) for m, v in state["hard"].items()} if state.get("hard") is not None else None
        self.average, self.averaged = state.get("average"), state.get("averaged", 0)
        self.rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        logger.info("resumed at step %d of %d", self.step, self.config.total_steps)
        return True

    def save_state(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        state = {
            "weights": self.model.network.trainable_state_dict(), "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(), "step": self.step, "history": self.history,
            "numpy_rng": self.rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
            "hard": None if self.hard is None else {m: v.tolist() for m, v in self.hard.items()},
            "average": self.average, "averaged": self.averaged,
        }
        temporary = self.out / (STATE_FILE + ".tmp")
        torch.save(state, temporary)
        replace_durably(temporary, self.out / STATE_FILE)

    def batch(self) -> list[int]:
        modality = self.modalities[self.step % len(self.modalities)]
        positives, negatives = self.pools[(modality, True)], self.pools[(modality, False)]
        wanted = round(self.config.batch_size * self.config.positive_fraction) if len(positives) else 0
        wanted = wanted if len(negatives) else self.config.batch_size
        chosen = list(self.rng.choice(positives, wanted)) if wanted else []
        clear = self.config.batch_size - wanted
        hard = (self.hard or {}).get(modality, np.zeros(0, int)) if self.step >= self.config.steps else np.zeros(0, int)
        from_hard = round(clear * self.config.hard_negative_fraction) if len(hard) and len(negatives) else 0
        chosen += list(self.rng.choice(hard, from_hard)) if from_hard else []
        chosen += list(self.rng.choice(negatives, clear - from_hard)) if len(negatives) else []
        return chosen

    def mine(self) -> dict[str, np.ndarray]:
        """The hard clear slices per modality (module docstring), from the weights as they are now."""
        clear = {m: self.pools[(m, False)] for m in self.modalities}
        hard = hard_negatives(self.model.network, self.data.embeddings, self.data.detail_inputs, clear,
                              self.config.hard_negative_pixels, self.config.autocast)
        self.model.network.image_encoder.eval()  # restored to training mode with the rest; the encoder stays frozen
        for m in self.modalities:
            logger.info("hard negatives, %s: %d of %d clear slices give a mask of %d pixels or more", m, len(hard[m]),
                        len(self.pools[(m, False)]), self.config.hard_negative_pixels)
        return hard

    def add_to_average(self) -> None:
        """Add the weights as they are now to the cycles' sum (floating-point tensors; others keep the last)."""
        weights = {k: v.detach().float().clone() if v.is_floating_point() else v.clone()
                   for k, v in self.model.network.trainable_state_dict().items()}
        if self.average is None:
            self.average = weights
        else:
            for k, v in weights.items():
                self.average[k] = self.average[k] + v if v.is_floating_point() else v
        self.averaged += 1

    def averaged_weights(self) -> dict[str, torch.Tensor]:
        """The mean of the weights at the cycles' ends (each in its parameter's own dtype)."""
        if not self.average:
            raise RuntimeError("no cycle has ended yet: there is nothing to average")
        current = self.model.network.trainable_state_dict()
        return {k: (v / self.averaged).to(current[k].dtype) if v.is_floating_point() else v
                for k, v in self.average.items()}

    def train(self, progress: bool = True, until: int | None = None) -> list[dict]:
        """Train to ``config.total_steps`` (or stop at step ``until``, as an interruption would); with
        ``average_cycles`` the network ends holding the cycles' mean weights."""
        network = self.model.network
        network.train()
        network.image_encoder.eval()
        total = self.config.total_steps
        bar = tqdm(total=total, initial=self.step, desc="training", disable=not progress, unit="step")
        while self.step < min(total, until or total):
            if self.step >= self.config.steps and (self.hard is None or self.config.cycle_start(self.step)):
                self.hard = self.mine() if self.config.hard_negative_fraction > 0 else {}  # fraction 0: nothing mined
            chosen = self.batch()
            samples = [self.data.samples[i] for i in chosen]
            embeddings = self.data.embeddings[chosen].float().to(self.model.device)
            if self.config.feature_dropout:
                embeddings = F.dropout2d(embeddings, self.config.feature_dropout)
            question = recognition_question(samples[0].modality)
            masks = [torch.from_numpy(s.masks).float() for s in samples]
            detail = None
            with torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=self.config.autocast):
                if self.data.detail_inputs is not None:
                    slices = self.data.detail_inputs[chosen]
                    if self.config.augment:
                        slices = augment_intensity(slices, self.rng)
                    detail = network.detail_features(torch.from_numpy(slices).float().to(self.model.device))
                parts = grounded_loss(network, embeddings, question, [s.answer for s in samples], masks, detail,
                                      self.config.lesion_weight)
            self.optimizer.zero_grad()
            parts.total.backward()
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], 1.0)
            self.optimizer.step()
            self.schedule.step()
            self.step += 1
            if self.config.average_cycles and self.step > self.config.steps and self.config.cycle_start(self.step):
                self.add_to_average()
            self.history.append({"step": self.step, "loss": float(parts.total.detach()), "text": parts.text,
                                 "bce": parts.bce, "dice": parts.dice, "clear_bce": parts.clear_bce,
                                 "presence": parts.presence})
            bar.update(1)
            bar.set_postfix(loss=f"{parts.total.item():.3f}", text=f"{parts.text:.3f}", dice=f"{parts.dice:.3f}")
            if self.step % self.config.checkpoint_every == 0 or self.step in (self.config.steps, total):
                self.save_state()
        bar.close()
        if self.config.average_cycles and self.step == total:
            network.load_state_dict(self.averaged_weights(), strict=False)
            logger.info("final weights: the mean of the %d hard-negative cycles' ends", self.averaged)
        network.eval()
        return self.history
