"""Which model the routes marked ``model = "active"`` use: the version an administrator activated, or the
checkpoint the node ships with until one is. Training only registers versions; it never activates one."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from dicom_node.config import ACTIVE_MODEL
from inference.model.card import CARD_FILE, ModelCard
from storage.models import ModelVersion, now_utc

SHIPPED_MODEL = Path(__file__).resolve().parents[1] / "models" / "default"


class UnknownModelError(LookupError):
    """No registered model version by that name."""


class VersionTakenError(ValueError):
    """A version name already registered: rebinding it would make an active version mean another model."""

    def __init__(self, version: str, path: str) -> None:
        super().__init__(f"version {version} is registered already ({path}): give the new model a new version name")


class DamagedModelError(ValueError):
    """A checkpoint folder whose model would not load: an unreadable card, or weights missing or changed."""


@dataclass(frozen=True)
class ModelEntry:
    version: str
    path: Path
    active: bool
    shipped: bool
    card: ModelCard | None


def check_new_version(session: Session, version: str) -> None:
    """Refuse a version name that is registered already (commands check before they write a checkpoint)."""
    row = session.scalar(select(ModelVersion).where(ModelVersion.version == version))
    if row is not None:
        raise VersionTakenError(version, row.path)


def register(session: Session, folder: Path, version: str) -> None:
    """Record a trained checkpoint (inactive) under a new version name; a name is never rebound."""
    check_new_version(session, version)
    session.add(ModelVersion(version=version, path=str(folder.resolve()), created_at=now_utc()))


def checked_checkpoint(folder: Path) -> ModelCard:
    """``folder``'s card, with its weights and any ensemble members' present and matching it: what loading the
    model checks before it builds the network (no network is built here)."""
    from inference.model.litemedsam import WeightsError, checked_checkpoint

    try:
        return checked_checkpoint(folder)
    except WeightsError as exc:
        raise DamagedModelError(str(exc)) from None


def activate(session: Session, version: str) -> Path:
    """Make ``version`` the active model (``shipped`` goes back to the shipped one); returns its folder. A model
    that would not load is refused (DamagedModelError), so the active one stays what it was."""
    if version == "shipped":
        session.execute(update(ModelVersion).values(active=False))
        return SHIPPED_MODEL
    row = session.scalar(select(ModelVersion).where(ModelVersion.version == version))
    if row is None:
        raise UnknownModelError(version)
    if not (Path(row.path) / CARD_FILE).is_file():
        raise UnknownModelError(f"{version}: {row.path} no longer holds a checkpoint")
    checked_checkpoint(Path(row.path))
    session.execute(update(ModelVersion).values(active=False))
    row.active, row.activated_at = True, now_utc()
    return Path(row.path)


def active_model(session: Session) -> Path:
    row = session.scalar(select(ModelVersion).where(ModelVersion.active.is_(True)))
    return Path(row.path) if row is not None else SHIPPED_MODEL


def resolve_model(session: Session, model: Path) -> Path:
    """A route's model: "active" is the active version (or the shipped one); a folder is itself."""
    return active_model(session) if model == ACTIVE_MODEL else model


def find_model(session: Session, name: str) -> Path:
    """A checkpoint named as an administrator names one: "shipped", "active", a registered version, or a
    folder holding a checkpoint (training's --start-from)."""
    if name == "shipped":
        return SHIPPED_MODEL
    if name == ACTIVE_MODEL.name:
        return active_model(session)
    row = session.scalar(select(ModelVersion).where(ModelVersion.version == name))
    folder = Path(row.path) if row is not None else Path(name)
    if not (folder / CARD_FILE).is_file():
        raise UnknownModelError(f"{name}: neither a registered version nor a checkpoint folder" if row is None
                                else f"{name}: {row.path} no longer holds a checkpoint")
    return folder


def list_models(session: Session) -> list[ModelEntry]:
    rows = session.scalars(select(ModelVersion).order_by(ModelVersion.created_at)).all()
    active = any(r.active for r in rows)
    entries = [shipped_entry(not active)]
    entries += [ModelEntry(r.version, Path(r.path), r.active, False, _card(Path(r.path))) for r in rows]
    return entries


def shipped_entry(active: bool) -> ModelEntry:
    return ModelEntry("shipped", SHIPPED_MODEL, active, True, _card(SHIPPED_MODEL))


def _card(folder: Path) -> ModelCard | None:
    try:
        return ModelCard.from_json((folder / CARD_FILE).read_text())
    except (OSError, ValueError, TypeError, KeyError):
        return None
