"""Where labelled series come from: the node's store, a folder of DICOM files, or the built-in synthesis.

All three end as :class:`LabeledSeries`: the files of one DICOM series and a DICOM-SEG of its findings,
with the subject (Patient ID) it belongs to, so that training reads DICOM through the inference pipeline and
splits never put one subject on both sides.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session

from inference.ground_truth import is_finding_category, segment_category
from storage.models import Instance, Patient, Series, Study
from training.anatomy import HEADS
from training.dataset import finding_label
from training.dicom_io import SeriesHeader, write_ground_truth, write_series
from training.synthesis import SyntheticStudy, brain_tumor_study, ct_study

logger = logging.getLogger(__name__)

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
NODE_MANUFACTURER = "dicom-node"  # the node's own AI SEGs: not ground truth, even when a PACS sends them back
_Latest = tuple[tuple[str, float, int], Path, tuple[str, ...]]  # a series' SEG: (its order, path, finding labels)


@dataclass(frozen=True)
class LabeledSeries:
    subject: str
    modality: str
    series: list[Path]
    segmentation: Path
    labels: tuple[str, ...] = ()


# -- a folder --------------------------------------------------------------------------------------------


def from_folder(folder: Path, modality: str | None = None, label: str | None = None) -> list[LabeledSeries]:
    """Every series under ``folder`` that a SEG in the folder refers to (the latest SEG per series)."""
    series_files: dict[str, list[Path]] = {}
    segs: dict[str, _Latest] = {}
    info: dict[str, tuple[str, str]] = {}  # series -> (patient id, modality)
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix != ".partial"):
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError, EOFError):
            continue
        if str(ds.get("SOPClassUID", "")) == SEG_SOP_CLASS:
            _keep_latest(segs, ds, path)
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        series_files.setdefault(uid, []).append(path)
        info[uid] = (str(ds.get("PatientID", "")), str(ds.get("Modality", "")))
    found = []
    for uid, (_, seg, labels) in segs.items():
        if uid not in series_files:
            # the SEG's path names its folder, often after the patient: only at DEBUG
            logger.warning("a SEG refers to series %s, which is not in the folder; skipped", uid)
            logger.debug("the SEG that refers to series %s: %s", uid, seg)
            continue
        subject, series_modality = info[uid]
        found.append(LabeledSeries(subject or uid, series_modality, series_files[uid], seg, labels))
    return _filtered(found, modality, label)


def _keep_latest(latest: dict[str, _Latest], ds: Dataset, path: Path) -> None:
    """Keep the SEG ``ds`` for its series when it may serve as ground truth and is no older than the one kept.
    SEGs come in path order, so a tie goes to the greater path, from a folder and from the store alike."""
    ground_truth = _ground_truth(ds)
    if ground_truth is not None:
        referenced, labels = ground_truth
        stamp = _seg_order(ds)
        if referenced not in latest or stamp >= latest[referenced][0]:
            latest[referenced] = (stamp, path, labels)


def _seg_order(ds: Dataset) -> tuple[str, float, int]:
    """(Content Date, Content Time as HHMMSS.F, Instance Number) of a SEG, as values: the latest SEG of a series has
    the greatest (compared as one text, instance 9 came after 10). A malformed time or number counts as 0."""
    whole, _, fraction = str(ds.get("ContentTime", "") or "").partition(".")
    try:
        time = float(f"{whole.ljust(6, '0')}.{fraction or '0'}")
    except ValueError:
        time = 0.0
    try:
        number = int(ds.get("InstanceNumber", "") or 0)
    except (TypeError, ValueError):
        number = 0
    return str(ds.get("ContentDate", "") or ""), time, number


def _ground_truth(ds) -> tuple[str, tuple[str, ...]] | None:  # type: ignore[no-untyped-def]
    """(referenced series UID, finding labels) of a SEG that may serve as ground truth, else None. A SEG with no
    finding segment (organs only) says nothing of lesions: neither ground truth of findings nor of a clear
    series, so it is skipped (a clear series' SEG has its finding segments empty)."""
    segments = ds.get("SegmentSequence", [])
    automatic = all(str(s.get("SegmentAlgorithmType", "")) == "AUTOMATIC" for s in segments)
    if str(ds.get("Manufacturer", "")) == NODE_MANUFACTURER and automatic:
        return None  # the node's own answer, not a reader's
    referenced = ds.get("ReferencedSeriesSequence")
    if not referenced:
        return None
    series_uid = str(referenced[0].SeriesInstanceUID)
    findings = [s for s in segments if is_finding_category(segment_category(s))]
    if not findings:
        logger.info("SEG %s of series %s segments no finding (only anatomy or other categories); not ground truth, "
                    "skipped", ds.get("SOPInstanceUID", ""), series_uid)
        return None
    # a SEG with a segment per lesion names each finding once
    labels = tuple(dict.fromkeys(finding_label(str(s.get("SegmentLabel", ""))) for s in findings))
    return series_uid, labels


def _filtered(found: list[LabeledSeries], modality: str | None, label: str | None) -> list[LabeledSeries]:
    if modality:
        found = [f for f in found if f.modality.upper() == modality.upper()]
    if label:
        found = [f for f in found if any(label.lower() in l.lower() for l in f.labels)]
    return found


# -- the node's store ------------------------------------------------------------------------------------


def from_store(session: Session, storage: Path, modality: str | None = None, label: str | None = None,
               since: date | None = None) -> list[LabeledSeries]:
    """Series in the node's store with a ground-truth SEG (a radiologist's, sent to the node), latest SEG each."""
    # Paths sorted here, not by ORDER BY: SQLite and PostgreSQL collate text apart, and a folder sorts alike.
    # The latest SEG is the folder's rule (Content Date/Time, Instance Number), not arrival: a PACS resends late.
    seg_paths = session.scalars(
        select(Instance.path).join(Series).join(Study)
        .where(Series.modality == "SEG", Instance.sop_class_uid == SEG_SOP_CLASS)
        .where(*([Study.study_date >= since.strftime("%Y%m%d")] if since else []))
    ).all()
    latest: dict[str, _Latest] = {}
    for path in sorted(seg_paths):
        _keep_latest(latest, dcmread(storage / path, stop_before_pixels=True), storage / path)
    found = []
    for uid, (_, seg, labels) in latest.items():
        series = session.scalar(select(Series).where(Series.series_instance_uid == uid))
        if series is None:
            logger.warning("a SEG refers to series %s, which the node does not hold; skipped", uid)
            continue
        # a fixed order: which of two slices at one position the volume keeps must not follow the database's
        paths = [storage / p for p in sorted(session.scalars(select(Instance.path).where(Instance.series_fk == series.id)))]
        patient = session.scalar(select(Patient.patient_id).join(Study).where(Study.id == series.study_fk))
        found.append(LabeledSeries(patient or uid, series.modality, paths, seg, labels))
    return _filtered(found, modality, label)


# -- synthesis -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SyntheticSpec:
    """How much synthetic data: subjects per kind; about a quarter of each kind has no lesion."""

    mr_subjects: int = 24
    ct_subjects: int = 24
    seed: int = 0


def synthetic_subject(modality: str, number: int) -> str:
    """The Patient ID (and folder name) of synthetic subject ``number`` of a modality: the first N subjects of any
    run are the same, so a run's subjects are known from its counts."""
    return f"SYN-{modality}-{number:04d}"


def synthetic(folder: Path, spec: SyntheticSpec = SyntheticSpec(), only: set[str] | None = None) -> list[LabeledSeries]:
    """Write the synthetic studies as DICOM + SEG into ``folder/seed-N`` and list them. A subject is a pure
    function of (seed, kind, number), so subjects already written are kept: asking for more adds only the new.
    ``only``: of the spec's subjects, just these (a held-out split scored without writing the rest)."""
    folder = folder / f"seed-{spec.seed}"
    heads: dict = {}
    for i in range(spec.mr_subjects):
        target = folder / synthetic_subject("MR", i)
        if (only is None or target.name in only) and not (target / "seg.dcm").is_file():
            heads = heads or {name: load() for name, load in HEADS.items()}
            rng = np.random.default_rng([spec.seed, 1, i])
            study = brain_tumor_study(heads[list(heads)[i % len(heads)]], rng, positive=i % 4 != 3)
            _write_study(target, study, default_label="Brain tumor")
    for i in range(spec.ct_subjects):
        target = folder / synthetic_subject("CT", i)
        if (only is None or target.name in only) and not (target / "seg.dcm").is_file():
            rng = np.random.default_rng([spec.seed, 2, i])
            region = "abdomen" if i % 2 == 0 else "chest"
            lesions = 0 if i % 4 == 3 else int(rng.integers(1, 3))
            study = ct_study(rng, region, lesions)
            _write_study(target, study, default_label="Liver tumor" if region == "abdomen" else "Lung nodule")
    wanted = synthetic_subjects(spec)
    if only is not None:
        wanted &= only
    return [item for item in from_folder(folder) if item.subject in wanted]


def synthetic_subjects(spec: SyntheticSpec) -> set[str]:
    """The names of the spec's subjects (what :func:`synthetic` writes)."""
    return ({synthetic_subject("MR", i) for i in range(spec.mr_subjects)}
            | {synthetic_subject("CT", i) for i in range(spec.ct_subjects)})


def _write_study(target: Path, study: SyntheticStudy, default_label: str) -> None:
    """The series, then the SEG under a temporary name renamed last: seg.dcm marks a complete subject."""
    header = SeriesHeader(target.name, study.modality, study.description, study.body_part)
    paths = write_series(target / "series", study.voxels, header, study.pixel_mm, study.slice_mm)
    lesions = [(label, mask) for label, mask in study.lesions if mask.any()]
    truth = lesions or {default_label: np.zeros(study.voxels.shape, bool)}  # one segment per lesion, tracked
    write_ground_truth(target / "seg.partial", paths, truth).replace(target / "seg.dcm")


def split_by_subject(items: list[LabeledSeries], held_out: float = 0.25, seed: int = 0) -> tuple[list[LabeledSeries], list[LabeledSeries]]:
    """(training, evaluation): whole subjects, about ``held_out`` of the subjects of each modality held out.

    One draw per set of modalities (CT only, MR only, CT and MR): a subject with a CT and an MR is held out in
    both or neither, and subjects of one modality each (the synthetic data) split as per-modality draws always did.
    """
    modalities: dict[str, set[str]] = {}
    for item in items:
        modalities.setdefault(item.subject, set()).add(item.modality)
    chosen: set[str] = set()
    for group in {frozenset(m) for m in modalities.values()}:
        chosen |= held_out_subjects([s for s, m in modalities.items() if m == group], held_out, seed)
    train, evaluate = [], []
    for modality in sorted({i.modality for i in items}):  # the order training has always read them in
        for item in items:
            if item.modality == modality:
                (evaluate if item.subject in chosen else train).append(item)
    return train, evaluate


def held_out_subjects(subjects: list[str], held_out: float = 0.25, seed: int = 0) -> set[str]:
    """The subjects of one modality, or one set of modalities, that :func:`split_by_subject` holds out. A function
    of the set of names and the seed only: a run on more subjects holds out others, which is why comparing two
    runs needs both splits."""
    names = sorted(set(subjects))
    order = np.random.default_rng([seed, len(names)]).permutation(len(names))
    count = max(1, round(held_out * len(names))) if len(names) > 1 else 0
    return {names[k] for k in order[:count]}
