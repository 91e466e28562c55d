"""DICOM UID validation (PS3.5 9.1).

Every UID that becomes part of a file path passes through :func:`validate_uid` first: a UID holds only
digits and dots, so a valid one can never escape the store's folder ("..", "/", NUL).
"""

from __future__ import annotations

import re

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
MAX_UID_LENGTH = 64


class InvalidUIDError(ValueError):
    """A value that should be a DICOM UID is missing or malformed."""

    def __init__(self, name: str, value: object, reason: str) -> None:
        self.name = name
        self.value = value
        super().__init__(f"{name} {value!r} is not a valid UID: {reason}")


def validate_uid(value: object, name: str = "UID") -> str:
    """Return the UID as a plain string, or raise InvalidUIDError saying what is wrong with it."""
    if value is None or value == "":
        raise InvalidUIDError(name, value, "missing")
    if not isinstance(value, str):
        raise InvalidUIDError(name, value, "not a string")
    uid = value.rstrip("\x00").strip()
    if len(uid) > MAX_UID_LENGTH:
        raise InvalidUIDError(name, value, f"longer than {MAX_UID_LENGTH} characters")
    if not _UID_RE.match(uid):
        raise InvalidUIDError(name, value, "only digits in dot-separated components without leading zeros")
    return uid


def is_valid_uid(value: object) -> bool:
    try:
        validate_uid(value)
    except InvalidUIDError:
        return False
    return True
