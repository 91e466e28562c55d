"""`dicom-node analyze`: the node's pipeline on a folder of DICOM files, without the network or the index.

For administrators trying the node and for checking a model on local data: every series in the folder
that a route (or ``--model``) covers is interpreted exactly as a received one would be, and its SEG, SR and
a JSON summary are written to the output folder.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from dicom_node.config import ACTIVE_MODEL, NodeConfig, Route
from dicom_node.pipeline import Question, interpret_series
from inference.model.litemedsam import WeightsError
from inference.model.loading import ModelCache
from inference.slicing import SlicingError
from storage.uids import InvalidUIDError, validate_uid

logger = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"


class NoSeriesError(ValueError):
    """The folder holds no DICOM series: nothing to analyze (said before any model is loaded)."""

    def __init__(self, folder: Path, skipped: int) -> None:
        super().__init__(f"no DICOM series in {folder} ({skipped} files that are not DICOM instances)")


@dataclass
class FolderSeries:
    paths: list[Path]
    modality: str
    description: str


def find_series(folder: Path) -> tuple[dict[str, FolderSeries], int]:
    """Series UID -> its files, and the number of files that are not DICOM instances (skipped)."""
    found: dict[str, FolderSeries] = {}
    skipped = 0
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            header = dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "Modality", "SeriesDescription", "SOPClassUID"])
        except (InvalidDicomError, OSError, ValueError, EOFError):
            skipped += 1
            continue
        uid = str(header.get("SeriesInstanceUID", ""))
        if not uid:
            skipped += 1
            continue
        entry = found.setdefault(uid, FolderSeries([], str(header.get("Modality", "")), str(header.get("SeriesDescription", ""))))
        entry.paths.append(path)
    return found, skipped


def analyze_folder(folder: Path, out: Path, config: NodeConfig, model_path: Path | None = None,
                   question: str = "", device: str = "auto") -> list[dict]:
    """Interpret every covered series under ``folder``; write ``out/<series UID>/{seg,sr}.dcm`` and summary.json.

    ``question``, where given, is asked of every series (a route's own question is only the default).
    Raises NoSeriesError where the folder holds no DICOM series."""
    series, skipped = find_series(folder)
    if not series:
        raise NoSeriesError(folder, skipped)
    if skipped:
        # A folder is often named after its patient: the path only at DEBUG (as every Patient ID)
        logger.info("%d files in the folder are not DICOM instances; skipped", skipped)
        logger.debug("the folder with the skipped files: %s", folder)
    models = ModelCache(device, config.jobs.encoder_precision)
    resolved: dict[Path, Path] = {}  # a route's model -> its checkpoint folder, looked up once
    summaries = []
    for uid, entry in series.items():
        route = (Route("--model", model_path, frozenset({entry.modality.upper()}), question=question) if model_path
                 else config.route_for(entry.modality, "", entry.description))
        if route is None:
            summaries.append({"series_instance_uid": uid, "modality": entry.modality, "assessment": "stored only",
                              "reason": "no route covers this series"})
            continue
        try:
            folder_name = validate_uid(uid, "Series Instance UID")
            outputs = interpret_series(entry.paths, lambda: models.get(_resolve(resolved, route.model, config)),
                                       Question(question or route.question, route.target))
        except (SlicingError, WeightsError, InvalidUIDError, OSError, ValueError) as exc:
            logger.error("series %s: %s", uid, exc)
            summaries.append({"series_instance_uid": uid, "modality": entry.modality, "error": f"{type(exc).__name__}: {exc}"})
            continue
        target = out / folder_name
        target.mkdir(parents=True, exist_ok=True)
        if outputs.seg is not None:
            outputs.seg.save_as(target / "seg.dcm", enforce_file_format=True)
        outputs.sr.save_as(target / "sr.dcm", enforce_file_format=True)
        summaries.append(outputs.summary())
    out.mkdir(parents=True, exist_ok=True)
    (out / SUMMARY_FILE).write_text(json.dumps(summaries, indent=2))
    return summaries


def _resolve(resolved: dict[Path, Path], model: Path, config: NodeConfig) -> Path:
    """The checkpoint a route's model names (model = "active" asks the node's database, once per run; with no
    database yet, the shipped model, and no database is created: analyze works without a node)."""
    if model not in resolved:
        if model == ACTIVE_MODEL:
            from dicom_node.model_registry import SHIPPED_MODEL, resolve_model
            from storage.database import missing_database, opened

            if missing_database(config.storage.database_url) is not None:  # a node that never ran activated nothing
                resolved[model] = SHIPPED_MODEL
                return SHIPPED_MODEL
            with opened(config.storage.database_url) as sessions, sessions() as session:
                resolved[model] = resolve_model(session, model)
        else:
            resolved[model] = model
    return resolved[model]
