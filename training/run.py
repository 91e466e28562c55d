"""One training run: gather labelled series, skip those that cannot be placed, split by subject, build samples
through the inference pipeline, cache the encoder's outputs, train, save, evaluate the saved model on the
held-out subjects, and write the figures into its model card."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from inference.model.builtin import BuiltinModel, mirror_images, pick_device
from inference.model.card import CARD_FILE, ModelCard
from inference.model.litemedsam import ArchitectureError, WeightsError
from inference.model.grounded import GroundedConfig
from inference.model.vocabulary import build_tokenizer
from storage.files import write_text_durably
from training.cache import CachedEncoderModel, EmbeddingCache, StoredEmbeddings
from training.dataset import SliceSample, series_samples
from training.detail_stacks import DetailStacks
from training.evaluate import UNPLACEABLE, evaluate, place, skipped_series
from training.sources import LabeledSeries, split_by_subject
from training.trainer import TrainConfig, Trainer, TrainingSet

logger = logging.getLogger(__name__)

# The mask decoder decides (GroundedConfig): on held-out synthetic subjects it found twice the lesion slices
# the language model did, at the same false positives (docs/model-history.md, "what was tried").
# min_mask_pixels: chosen on validation subjects (benchmarks/operating_point.py; README)
DEFAULT_ARCHITECTURE = dataclasses.replace(GroundedConfig(), image_tokens_side=8, decision="decoder",
                                           region_tokens=True, min_mask_pixels=5).to_dict()


class TrainingDataError(ValueError):
    """The labelled data cannot train a model (none found, or labels the vocabulary cannot say)."""


@dataclass(frozen=True)
class TrainRequest:
    out: Path
    cache: Path
    version: str
    config: TrainConfig = TrainConfig()
    negatives_per_series: int | None = None  # clear slices per series; None: all with body in them
    held_out: float = 0.25
    resume: bool = False
    device: str = "auto"
    description: str = ""
    command: str = ""
    architecture: dict = field(default_factory=lambda: dict(DEFAULT_ARCHITECTURE))
    min_lesion_slices: int | dict[str, int] = 2  # the operating point written into the card (ModelCard.min_lesion_slices)
    aligned_lesion_overlap: float | dict[str, float] | None = None  # and its exception (ModelCard.aligned_lesion_overlap)
    mask_threshold: float | dict[str, float] | None = None  # and the masks' threshold (ModelCard.mask_threshold)
    mirror: bool = False  # train on left-right mirrored copies of every training slice too (with_mirrored)
    progress: bool = True  # a progress bar while training (off for logs and scheduled jobs)
    # The frozen encoder's precision, in training and in the card (ModelCard.encoder_precision): fp32 runs
    # alike on every CPU; bf16 only pays on CPUs with native bf16.
    encoder_precision: str = "fp32"
    # A checkpoint folder whose trained weights training starts from (fine-tuning) instead of LiteMedSAM's
    # decoder and fresh heads; ``architecture`` and ``encoder_precision`` must be its own (the CLI takes them
    # from its card).
    start_from: Path | None = None


def check_labels(items: list[LabeledSeries]) -> list[str]:
    """The finding labels, each made of words the model's vocabulary has (else a clear error)."""
    from training.dataset import finding_label

    vocabulary = build_tokenizer().get_vocab()
    labels = sorted({finding_label(l) for item in items for l in item.labels})
    unknown = sorted({w for l in labels for w in l.replace(",", " ").split() if w not in vocabulary})
    if unknown:
        raise TrainingDataError(f"segment labels use words the model cannot say: {', '.join(unknown)} "
                                f"(rename the segments, e.g. to 'Liver tumor', 'Brain tumor', 'Lung nodule')")
    return labels


def placeable(items: list[LabeledSeries]) -> tuple[list[LabeledSeries], list[dict[str, str]]]:
    """(the items whose series is one stack with its SEG on it, the card's record of the others): a hospital's
    store holds incomplete series and SEGs drawn elsewhere; each is skipped with a warning, not the whole run.
    Checked before the split, so that the card's findings, modalities and held-out subjects are those of the
    series that trained and evaluated. Reads each series once more: seconds, against hours of training."""
    usable, skipped = [], []
    for item in items:
        try:
            place(item)
        except UNPLACEABLE as exc:
            skipped.append(skipped_series(item, exc, "training data"))
        else:
            usable.append(item)
    if skipped and not usable:
        more = f" (and {len(skipped) - 1} more; the warnings name each series)" if len(skipped) > 1 else ""
        raise TrainingDataError(f"none of the {len(skipped)} labelled series can be placed on its slices: "
                                f"{skipped[0]['reason']}{more}")
    return usable, skipped


def build_training_set(items: list[LabeledSeries], cache: EmbeddingCache, negatives: int | None, seed: int,
                       size: int, normalization, context: int | None = None) -> TrainingSet:  # type: ignore[no-untyped-def]
    """Every slice with a finding and (up to ``negatives``) clear slices with body in them, per series: the
    model must learn what "No findings." looks like from as many slices as it will meet. ``context``: for a
    model with a detail branch, the neighbours each side it sees (the set then keeps each slice's stack)."""
    rng = np.random.default_rng(seed)
    samples: list[SliceSample] = []
    embeddings = []
    stacks = []
    for n, item in enumerate(items, start=1):
        series = series_samples(item.series, item.segmentation, size, normalization)
        positive = [s for s in series if s.labels]
        clear = [s for s in series if not s.labels and (s.image > 0.05).mean() > 0.02]
        picked = positive + [clear[i] for i in sorted(rng.permutation(len(clear))[:negatives if negatives is not None else len(clear)])]
        embeddings.extend(cache.stored(np.stack([s.image for s in picked])).paths)
        if context is not None:  # the series' slices held once, by the stacks and the samples alike
            volume = np.stack([s.image for s in series])
            picked = [dataclasses.replace(s, image=volume[s.slice_index]) for s in picked]
            stacks.append(DetailStacks.of_series(volume, [s.slice_index for s in picked], context))
        samples.extend(picked)
        logger.info("series %d/%d (%s): %d slices with findings, %d clear", n, len(items), item.modality, len(positive),
                    len(picked) - len(positive))
        logger.debug("series %d/%d is subject %s", n, len(items), item.subject)  # a Patient ID: never at INFO
    return TrainingSet(samples, StoredEmbeddings(embeddings), DetailStacks.joined(stacks) if stacks else None)


def with_mirrored(data: TrainingSet, cache: EmbeddingCache) -> TrainingSet:
    """``data`` plus each slice mirrored left-right, masks and all, its embedding from the encoder (the
    frozen encoder is not mirror-symmetric, so a mirrored embedding cannot be made by flipping one). Twice the
    lesion shapes and positions for a decoder that otherwise fits a few hundred masks (docs/model-history.md, run 7)."""
    flipped = [dataclasses.replace(s, image=mirror_images(s.image), masks=mirror_images(s.masks)) for s in data.samples]
    embeddings = cache.stored(np.stack([s.image for s in flipped])) if flipped else StoredEmbeddings([])
    stacks = None if data.detail_inputs is None else data.detail_inputs + data.detail_inputs.mirrored()
    return TrainingSet(data.samples + flipped, data.embeddings + embeddings, stacks)


def starting_model(card: ModelCard, start_from: Path | None, device: torch.device) -> tuple[BuiltinModel, ModelCard | None]:
    """(the model to train, the card of the checkpoint it starts from). Fresh heads on LiteMedSAM's decoder, or
    ``start_from``'s trained weights: a site with a few dozen SEGs refines the model it runs instead of
    training one from nothing. The new model can still say what the starting one could (findings, modalities)."""
    if start_from is None:
        return BuiltinModel.new(card, device=device), None
    try:
        base = ModelCard.from_json((start_from / CARD_FILE).read_text())
    except (OSError, ValueError, KeyError, TypeError) as exc:  # no card, or not one
        raise TrainingDataError(f"cannot start from {start_from}: no readable {CARD_FILE} there ({exc})") from None
    if base.encoder_precision != card.encoder_precision:
        raise TrainingDataError(f"{start_from} was trained on a {base.encoder_precision} encoder, not {card.encoder_precision}")
    card = dataclasses.replace(card, findings=tuple(sorted(set(card.findings) | set(base.findings))),
                               modalities=tuple(sorted(set(card.modalities) | set(base.modalities))))
    try:
        return BuiltinModel.load(start_from, device=device, card=card), base
    except ArchitectureError as exc:
        raise TrainingDataError(f"{start_from} was built with another architecture than asked for: {exc}") from None
    except WeightsError as exc:
        raise TrainingDataError(f"cannot start from {start_from}: {exc}") from None


def run_training(items: list[LabeledSeries], request: TrainRequest) -> ModelCard:
    if not items:
        raise TrainingDataError("no labelled series found")
    started = time.time()
    items, skipped = placeable(items)
    labels = check_labels(items)
    train_items, eval_items = split_by_subject(items, request.held_out, request.config.seed)
    if not train_items:
        raise TrainingDataError("every subject is held out for evaluation: add subjects")
    torch.manual_seed(request.config.seed)
    modalities = tuple(sorted({i.modality for i in items}))
    card = ModelCard(name="dicom-node built-in", version=request.version, architecture=request.architecture,
                     min_lesion_slices=request.min_lesion_slices, aligned_lesion_overlap=request.aligned_lesion_overlap,
                     mask_threshold=request.mask_threshold,
                     encoder_precision=request.encoder_precision,
                     modalities=modalities, findings=tuple(labels), training_data=request.description)
    model, base = starting_model(card, request.start_from, pick_device(request.device))
    cache = EmbeddingCache(request.cache, model)
    config = model.network.config
    data = build_training_set(train_items, cache, request.negatives_per_series, request.config.seed,
                              model.input_size, model.normalization, config.context_slices if config.detail_width else None)
    if request.mirror:
        data = with_mirrored(data, cache)
    logger.info("%d training slices from %d series (%d subjects); %d series held out", len(data.samples),
                len(train_items), len({i.subject for i in train_items}), len(eval_items))
    trainer = Trainer(model, data, request.config, request.out)
    if request.resume:
        trainer.resume()
    history = trainer.train(progress=request.progress)
    model.save(request.out, dtype=torch.bfloat16)
    trained = BuiltinModel.load(request.out, device=model.device)  # evaluate what was saved, bf16 rounding and all
    metrics = evaluate(eval_items, CachedEncoderModel(trained, EmbeddingCache(request.cache, trained))) if eval_items else {}
    metrics["training"] = {
        "series": len(train_items), "subjects": len({i.subject for i in train_items}), "slices": len(data.samples),
        "held_out_series": len(eval_items), "held_out_subjects": len({i.subject for i in eval_items}),
        "skipped_series": skipped,
        "steps": request.config.steps, "hard_negative_steps": request.config.hard_negative_steps,
        "hard_negative_cycles": request.config.hard_negative_cycles, "average_cycles": request.config.average_cycles,
        "lesion_weight": request.config.lesion_weight, "learning_rate": request.config.learning_rate,
        "feature_dropout": request.config.feature_dropout,
        "start_from": None if base is None else {"version": base.version, "weights_sha256": base.weights_sha256},
        "hard_negatives": {m: len(v) for m, v in (trainer.hard or {}).items()}, "final_loss": round(float(np.mean([h["loss"] for h in history[-50:]])), 4) if history else None,
        "minutes": round((time.time() - started) / 60, 1), "command": request.command, "seed": request.config.seed,
    }
    card = dataclasses.replace(trained.card, metrics=metrics)
    write_text_durably(request.out / CARD_FILE, card.to_json())
    (request.out / "history.json").write_text(json.dumps(history))
    return card
