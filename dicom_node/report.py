"""What the node holds and does, for `dicom-node status` (read-only, safe while the node runs)."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from storage.models import Instance, Job, Patient, Series, Study


@dataclass(frozen=True)
class StoreSummary:
    patients: int
    studies: int
    series: int
    instances: int
    bytes_stored: int
    bytes_free: int


def summarize(session: Session, storage_path: Path) -> StoreSummary:
    count = lambda model: session.scalar(select(func.count(model.id))) or 0  # noqa: E731
    return StoreSummary(
        patients=count(Patient),
        studies=count(Study),
        series=count(Series),
        instances=count(Instance),
        bytes_stored=session.scalar(select(func.coalesce(func.sum(Instance.size_bytes), 0))) or 0,
        bytes_free=shutil.disk_usage(storage_path).free if storage_path.exists() else 0,
    )


@dataclass(frozen=True)
class JobLine:
    id: int
    series_instance_uid: str
    modality: str
    description: str
    run: int
    attempts: int
    at: datetime | None
    detail: str


@dataclass(frozen=True)
class JobSummary:
    counts: dict[str, int]
    queued: list[JobLine]
    running: list[JobLine]
    failed: list[JobLine]
    recent: list[JobLine]  # the latest finished jobs, newest first, with their findings in short


def summarize_jobs(session: Session, recent: int = 10) -> JobSummary:
    counts = dict(session.execute(select(Job.status, func.count(Job.id)).group_by(Job.status)).all())

    def lines(status: str, order: Any, limit: int | None = None) -> list[JobLine]:
        stmt = select(Job, Series).join(Series, Job.series_fk == Series.id).where(Job.status == status).order_by(order).limit(limit)
        return [_line(job, series) for job, series in session.execute(stmt).all()]

    return JobSummary(counts, lines("queued", Job.next_attempt_at, 20), lines("running", Job.started_at),
                      lines("failed", Job.id.desc(), 20), lines("done", Job.finished_at.desc(), recent))


def _line(job: Job, series: Series) -> JobLine:
    at = {"queued": job.next_attempt_at, "running": job.started_at}.get(job.status, job.finished_at)
    detail = job.error if job.status == "failed" else _findings(job.summary) if job.status == "done" else job.error
    return JobLine(job.id, series.series_instance_uid, series.modality, series.series_description, job.run,
                   job.attempts, at, detail)


def _findings(summary_json: str) -> str:
    """"2 findings: Liver tumor (12.3 mL, high), ..." or "no findings" or "not assessed: reason"."""
    try:
        summary = json.loads(summary_json)
    except ValueError:
        return ""
    if summary.get("assessment") != "assessed":
        return f"not assessed: {summary.get('reason', '')}"
    lesions = summary.get("lesions", [])
    if not lesions:
        return "no findings"
    shown = ", ".join(f"{l['label']} ({l['volume_ml']:.1f} mL, {l['reliability']})" for l in lesions[:3])
    return f"{len(lesions)} finding(s): {shown}{', ...' if len(lesions) > 3 else ''}"
