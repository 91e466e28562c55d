"""What the node holds, for `dicom-node status` (read-only, safe while the node runs)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from storage.models import Instance, Patient, Series, Study


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
