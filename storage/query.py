"""C-FIND matching (PS3.4 C.2.2.2) translated into SQL over the index.

Input is the query identifier as plain ``{keyword: value}`` strings; output is one ``{keyword: value}`` per
match. Supported matching: universal (empty value), single value, wildcard (``*``, ``?``; case-insensitive
for person names), UID list (``\\``-separated), and date/time ranges (``A-B``, ``A-``, ``-B``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

from sqlalchemy import ColumnElement, Select, String, and_, cast, false, func, or_, select
from sqlalchemy.orm import InstrumentedAttribute, Session

logger = logging.getLogger(__name__)

from storage.models import SQL_INTEGER_RANGE, Instance, Patient, Series, Study


class QueryLevel(str, Enum):
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


class QueryError(ValueError):
    """The identifier cannot be answered (unknown level, bad range)."""


class Match(Enum):
    EXACT = "exact"
    NAME = "name"
    UID = "uid"
    RANGE = "range"


@dataclass(frozen=True)
class Key:
    column: InstrumentedAttribute[Any]
    level: QueryLevel
    match: Match = Match.EXACT


KEYS: dict[str, Key] = {
    "PatientID": Key(Patient.patient_id, QueryLevel.STUDY),
    "PatientName": Key(Patient.patient_name, QueryLevel.STUDY, Match.NAME),
    "PatientBirthDate": Key(Patient.patient_birth_date, QueryLevel.STUDY, Match.RANGE),
    "PatientSex": Key(Patient.patient_sex, QueryLevel.STUDY),
    "StudyInstanceUID": Key(Study.study_instance_uid, QueryLevel.STUDY, Match.UID),
    "StudyDate": Key(Study.study_date, QueryLevel.STUDY, Match.RANGE),
    "StudyTime": Key(Study.study_time, QueryLevel.STUDY, Match.RANGE),
    "AccessionNumber": Key(Study.accession_number, QueryLevel.STUDY),
    "StudyID": Key(Study.study_id, QueryLevel.STUDY),
    "StudyDescription": Key(Study.study_description, QueryLevel.STUDY, Match.NAME),
    "ReferringPhysicianName": Key(Study.referring_physician_name, QueryLevel.STUDY, Match.NAME),
    "SeriesInstanceUID": Key(Series.series_instance_uid, QueryLevel.SERIES, Match.UID),
    "Modality": Key(Series.modality, QueryLevel.SERIES),
    "SeriesNumber": Key(Series.series_number, QueryLevel.SERIES),
    "SeriesDescription": Key(Series.series_description, QueryLevel.SERIES, Match.NAME),
    "BodyPartExamined": Key(Series.body_part_examined, QueryLevel.SERIES),
    "SOPInstanceUID": Key(Instance.sop_instance_uid, QueryLevel.IMAGE, Match.UID),
    "SOPClassUID": Key(Instance.sop_class_uid, QueryLevel.IMAGE, Match.UID),
    "InstanceNumber": Key(Instance.instance_number, QueryLevel.IMAGE),
    "NumberOfFrames": Key(Instance.number_of_frames, QueryLevel.IMAGE),
}
_ORDER = [QueryLevel.STUDY, QueryLevel.SERIES, QueryLevel.IMAGE]
COUNT_KEYS = {
    "NumberOfStudyRelatedSeries",
    "NumberOfStudyRelatedInstances",
    "NumberOfSeriesRelatedInstances",
    "ModalitiesInStudy",
}


def find(session: Session, level: QueryLevel, identifier: dict[str, str], limit: int = 10_000) -> Iterator[dict[str, Any]]:
    """Yield the requested keys of every entity at ``level`` that matches ``identifier``."""
    depth = _ORDER.index(level)
    usable = {k: v for k, v in identifier.items() if k in KEYS and _ORDER.index(KEYS[k].level) <= depth}
    stmt = _base_select(level)
    for keyword, value in usable.items():
        condition = _condition(KEYS[keyword], value)
        if condition is not None:
            stmt = stmt.where(condition)
    if level == QueryLevel.STUDY:
        stmt = _where_modalities_in_study(stmt, identifier.get("ModalitiesInStudy", ""))
    rows = session.execute(stmt.limit(limit + 1)).all()
    if len(rows) > limit:
        logger.warning("C-FIND at %s level matched more than %d entities; answering the first %d", level.value, limit, limit)
    for row in rows[:limit]:
        patient, study, series, instance = (list(row) + [None, None])[:4]
        yield _answer(session, identifier, patient, study, series, instance)


def _where_modalities_in_study(stmt: Select[Any], value: str) -> Select[Any]:
    """Keep the studies with a series whose Modality matches one of the values (``*`` alone: every study)."""
    condition = _condition(KEYS["Modality"], value)
    if condition is None:
        return stmt
    return stmt.where(Study.id.in_(select(Series.study_fk).where(condition)))


def _base_select(level: QueryLevel) -> Select[Any]:
    if level == QueryLevel.STUDY:
        return select(Patient, Study).join(Study, Study.patient_fk == Patient.id).order_by(Study.id)
    stmt = select(Patient, Study, Series).join(Study, Study.patient_fk == Patient.id).join(
        Series, Series.study_fk == Study.id
    )
    if level == QueryLevel.SERIES:
        return stmt.order_by(Series.id)
    return stmt.add_columns(Instance).join(Instance, Instance.series_fk == Series.id).order_by(Instance.id)


def _condition(key: Key, value: str) -> ColumnElement[bool] | None:
    value = value.strip() if isinstance(value, str) else value
    if value in ("", None, "*"):
        return None  # universal matching
    column = key.column
    if key.match == Match.UID:
        uids = [u for u in str(value).split("\\") if u]
        return column.in_(uids)
    if key.match == Match.RANGE and "-" in str(value):
        low, _, high = str(value).partition("-")
        parts = []
        if low:
            parts.append(column >= low)
        if high:
            parts.append(column <= high)
        if not parts:
            raise QueryError(f"range {value!r} has neither start nor end")
        return and_(*parts)
    if key.match in (Match.EXACT, Match.NAME, Match.RANGE) and "\\" in str(value):
        alternatives = [_condition(key, v) for v in str(value).split("\\") if v.strip()]
        if not alternatives or any(a is None for a in alternatives):
            return None  # "*" among the values matches everything
        return or_(*alternatives)  # type: ignore[misc]
    text = str(value)
    if "*" in text or "?" in text:
        pattern = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        pattern = pattern.replace("*", "%").replace("?", "_")
        if key.match == Match.NAME:
            return func.lower(column).like(pattern.lower(), escape="\\")
        return cast(column, String).like(pattern, escape="\\")  # integer keys too (SeriesNumber=1*)
    if column.type.python_type is int:
        try:
            number = int(text)
        except ValueError:
            raise QueryError(f"{text!r} is not a number") from None
        # Beyond an SQL INTEGER nothing is stored (ingest drops it) and SQLite cannot even bind it: no match.
        return column == number if number in SQL_INTEGER_RANGE else false()
    if key.match == Match.NAME:
        return func.lower(column) == text.lower()
    return column == text


def _answer(session: Session, identifier: dict[str, str], patient: Patient, study: Study,
            series: Series | None, instance: Instance | None) -> dict[str, Any]:
    rows = {Patient: patient, Study: study, Series: series, Instance: instance}
    answer: dict[str, Any] = {}
    for keyword in identifier:
        key = KEYS.get(keyword)
        if key is not None:
            row = rows[key.column.class_]
            answer[keyword] = getattr(row, key.column.key) if row is not None else None
        elif keyword in COUNT_KEYS:
            answer[keyword] = _count(session, keyword, study, series)
    return answer


def _count(session: Session, keyword: str, study: Study, series: Series | None) -> Any:
    if keyword == "ModalitiesInStudy":
        rows = session.scalars(select(Series.modality).where(Series.study_fk == study.id).distinct())
        return sorted(m for m in rows if m)
    if keyword == "NumberOfStudyRelatedSeries":
        return session.scalar(select(func.count(Series.id)).where(Series.study_fk == study.id))
    if keyword == "NumberOfStudyRelatedInstances":
        return session.scalar(
            select(func.count(Instance.id)).join(Series, Instance.series_fk == Series.id).where(Series.study_fk == study.id)
        )
    if series is None:
        return None
    return session.scalar(select(func.count(Instance.id)).where(Instance.series_fk == series.id))
