"""C-FIND (Study Root) answered from the index: identifier in, matching identifiers out."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from pydicom import config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import status
from dicom_node.ingest import value_text
from storage.query import QueryError, QueryLevel, find

logger = logging.getLogger(__name__)

_SKIP = {"QueryRetrieveLevel", "SpecificCharacterSet"}


def answer_find(sessions: sessionmaker[Session], identifier: Dataset) -> Iterator[tuple[int, Dataset | None]]:
    """Yield (PENDING, match) per match, then nothing: pynetdicom sends the final SUCCESS itself."""
    try:
        level = QueryLevel(str(identifier.get("QueryRetrieveLevel", "")).strip().upper())
    except ValueError:
        yield status.DATASET_MISMATCH, None
        return
    query = identifier_to_query(identifier)
    try:
        with sessions() as session:
            matches = list(find(session, level, query))
    except QueryError as exc:
        logger.warning("C-FIND refused: %s", exc)
        yield status.CANNOT_UNDERSTAND, None
        return
    except SQLAlchemyError as exc:
        logger.error("C-FIND failed: %s", type(exc).__name__)
        yield status.OUT_OF_RESOURCES, None
        return
    logger.info("C-FIND at %s level: %d matches", level.value, len(matches))
    for match in matches:
        yield status.PENDING, match_to_dataset(level, match)


def identifier_to_query(identifier: Dataset) -> dict[str, str]:
    """The identifier's keys as text; sequences (not matched by this node) become universal keys."""
    query: dict[str, str] = {}
    for element in identifier:
        keyword = element.keyword
        if not keyword or keyword in _SKIP:
            continue
        value = element.value
        if isinstance(value, Sequence) or value is None:
            query[keyword] = ""
        else:
            query[keyword] = value_text(value)
    return query


def match_to_dataset(level: QueryLevel, match: dict[str, Any]) -> Dataset:
    """The answer as stored, unvalidated: pydicom would log a malformed stored value (a birth date written
    "01/01/1980", say) at WARNING, the value with it, and a C-FIND answers what the node holds."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.QueryRetrieveLevel = level.value
    for keyword, value in match.items():
        tag = tag_for_keyword(keyword)
        if tag is not None:
            ds[tag] = DataElement(tag, dictionary_VR(tag), "" if value is None else value, validation_mode=config.IGNORE)
    return ds
