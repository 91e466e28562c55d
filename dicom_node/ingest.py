"""From a received C-STORE data set to the record the index keeps.

Only the header elements the index needs are decoded (``specific_tags`` and ``stop_before_pixels``); the
pixel data is never parsed, and the file is stored byte for byte as the sender encoded it.
"""

from __future__ import annotations

from datetime import datetime
import struct
import threading
import warnings
import zlib
from io import BytesIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.errors import InvalidDicomError
from pydicom.tag import Tag

from storage.index import InstanceRecord
from storage.models import SQL_INTEGER_RANGE, Base
from dicom_node import status
from dicom_node.header import HeaderFormatError, UnexpectedImplicitVRError, read_elements
from storage.uids import InvalidUIDError, is_valid_uid, validate_uid

_TEXT_KEYWORDS = {
    "PatientID": "patient_id",
    "PatientName": "patient_name",
    "PatientBirthDate": "patient_birth_date",
    "PatientSex": "patient_sex",
    "StudyDate": "study_date",
    "StudyTime": "study_time",
    "AccessionNumber": "accession_number",
    "StudyID": "study_id",
    "StudyDescription": "study_description",
    "ReferringPhysicianName": "referring_physician_name",
    "Modality": "modality",
    "SeriesDescription": "series_description",
    "BodyPartExamined": "body_part_examined",
}
_INT_KEYWORDS = {"SeriesNumber": "series_number", "InstanceNumber": "instance_number", "NumberOfFrames": "number_of_frames"}
# What the index's columns hold (an SQL INTEGER; each text column's length): a value beyond it is made to fit,
# since PostgreSQL would refuse the row, SQLite the integer, and the instance with them (see _fitting, _int).
_DATE_TIME_COLUMNS = {"patient_birth_date", "study_date", "study_time"}
_COLUMN_LENGTHS = {column.name: column.type.length for table in Base.metadata.tables.values()
                   for column in table.columns if getattr(column.type, "length", None)}
_UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
_HEADER_KEYWORDS = ("SpecificCharacterSet", "FrameOfReferenceUID", *_UID_KEYWORDS, *_TEXT_KEYWORDS, *_INT_KEYWORDS)
HEADER_TAGS = [Tag(k) for k in _HEADER_KEYWORDS]


class InvalidInstanceError(ValueError):
    """A received data set the node will not store, with the DIMSE status to answer."""

    def __init__(self, status: int, message: str) -> None:
        self.status = status
        super().__init__(message)


# A UUID-derived UID (ISO/IEC 9834-8, PS3.5 B.2): the project has no registered root of its own.
IMPLEMENTATION_CLASS_UID = "2.25.265063324349322293082293886334579654349"


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae: str) -> bytes:
    """Preamble, ``DICM`` and File Meta Information (PS3.10 7.1) for a data set received over the network.

    Encoded by hand (explicit VR little endian, as the standard fixes it) because building it through
    pydicom costs more than everything else the node does per instance apart from the fsync.
    """
    from dicom_node import __version__

    elements = [
        _meta_element(0x0001, b"OB", b"\x00\x01"),
        _meta_element(0x0002, b"UI", _uid_bytes(sop_class_uid)),
        _meta_element(0x0003, b"UI", _uid_bytes(sop_instance_uid)),
        _meta_element(0x0010, b"UI", _uid_bytes(transfer_syntax_uid)),
        _meta_element(0x0012, b"UI", _uid_bytes(IMPLEMENTATION_CLASS_UID)),
        _meta_element(0x0013, b"SH", _text_bytes(f"DICOMNODE_{__version__}"[:16])),
    ]
    if source_ae:
        elements.append(_meta_element(0x0016, b"AE", _text_bytes(source_ae[:16])))
    body = b"".join(elements)
    group_length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return b"\x00" * 128 + b"DICM" + group_length + body


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2sHI", 0x0002, element, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def _uid_bytes(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text_bytes(text: str) -> bytes:
    raw = text.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


_KEYWORD_OF = {int(Tag(k)): k for k in _HEADER_KEYWORDS}
_WANTED = frozenset(_KEYWORD_OF)
_SIMPLE_CHARSETS = {"": "latin-1", "ISO_IR 6": "latin-1", "ISO_IR 100": "latin-1", "ISO_IR 192": "utf-8"}
_LITTLE_ENDIAN_IMPLICIT = "1.2.840.10008.1.2"
_NOT_WALKABLE = {"1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"}  # deflated, big endian


def read_header(meta: bytes, dataset: bytes, transfer_syntax_uid: str) -> dict[str, str]:
    """The index's header elements as text, keyed by DICOM keyword (absent elements are absent)."""
    if transfer_syntax_uid not in _NOT_WALKABLE:
        try:
            raw = read_elements(dataset, _WANTED, explicit_vr=transfer_syntax_uid != _LITTLE_ENDIAN_IMPLICIT)
        except UnexpectedImplicitVRError:
            raw = None
        except HeaderFormatError as exc:
            raise InvalidInstanceError(status.CANNOT_UNDERSTAND, f"data set cannot be parsed: {exc}") from None
        if raw is not None:
            charset = raw.get(0x00080005, b"").decode("latin-1").strip(" \x00")
            encoding = _SIMPLE_CHARSETS.get(charset)
            if encoding is not None:
                return {_KEYWORD_OF[tag]: _decode(value, encoding) for tag, value in raw.items()}
    return _read_header_pydicom(meta + dataset)


def _decode(value: bytes, encoding: str) -> str:
    return value.decode(encoding, "replace").strip(" \x00")


# catch_warnings swaps process-wide state: two associations in it at once would swap each other's warnings.
_WARNINGS_LOCK = threading.Lock()


def _read_header_pydicom(file_bytes: bytes) -> dict[str, str]:
    """The slow, general path: any transfer syntax and any character set pydicom knows."""
    try:
        with _WARNINGS_LOCK, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            header = dcmread(BytesIO(file_bytes), stop_before_pixels=True, specific_tags=HEADER_TAGS)
    # zlib: a corrupt deflated data set; struct: a truncated header; recursion: sequences nested hundreds deep
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError, NotImplementedError,
            zlib.error, struct.error, RecursionError) as exc:
        raise InvalidInstanceError(status.CANNOT_UNDERSTAND, f"data set cannot be parsed: {exc}") from None
    truncated = [w for w in caught if "End of file reached" in str(w.message)]
    if truncated:
        raise InvalidInstanceError(status.CANNOT_UNDERSTAND, f"data set cannot be parsed: {truncated[0].message}")
    return {keyword: _text(header, keyword) for keyword in _KEYWORD_OF.values() if keyword in header}


def to_record(header: dict[str, str], transfer_syntax_uid: str, calling_ae: str, received_at: datetime) -> InstanceRecord:
    """Validate the UIDs and build the index record; ``path`` and ``size_bytes`` are filled in by the caller."""
    uids = {}
    for keyword in _UID_KEYWORDS:
        value = header.get(keyword, "")
        try:
            uids[keyword] = validate_uid(value, keyword)
        except InvalidUIDError as exc:
            raise InvalidInstanceError(status.MISSING_UID if not value else status.INVALID_UID, str(exc)) from None
    fields: dict[str, object] = {name: _fitting(header.get(kw, ""), name) for kw, name in _TEXT_KEYWORDS.items()}
    fields.update({name: _int(header.get(kw, "")) for kw, name in _INT_KEYWORDS.items()})
    fields["number_of_frames"] = fields["number_of_frames"] or 1
    frame_of_reference = header.get("FrameOfReferenceUID", "")
    return InstanceRecord(
        sop_instance_uid=uids["SOPInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        transfer_syntax_uid=transfer_syntax_uid,
        path="",
        size_bytes=0,
        received_at=received_at,
        calling_ae_title=calling_ae,
        frame_of_reference_uid=frame_of_reference if is_valid_uid(frame_of_reference) else "",
        **fields,  # type: ignore[arg-type]
    )


def _text(header: Dataset, keyword: str) -> str:
    """An element's value as text; undecodable characters (a wrong charset) must not lose the instance."""
    try:
        value = header.get(keyword)
    except Exception:  # noqa: BLE001 - pydicom raises many types on malformed values
        return ""
    if value is None:
        return ""
    return value_text(value).strip().rstrip("\x00")


def value_text(value: object) -> str:
    """An element value as DICOM text: the values of a multi-valued element joined by backslashes."""
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(str(v) for v in value)
    return str(value)


def _int(text: str) -> int | None:
    """An IS value; a malformed one, or one no SQL INTEGER holds, is dropped from the index rather than refusing
    the instance (the file keeps it)."""
    try:
        value = int(text.split("\\")[0]) if text else None
    except ValueError:
        return None
    return value if value is None or value in SQL_INTEGER_RANGE else None


def _fitting(text: str, column: str) -> str:
    """A text value cut to its index column where it is longer (longer than its VR allows: a 70-character
    description); a date or time that long is malformed ("1980-01-01") and dropped instead. The file keeps
    the value as sent."""
    length = _COLUMN_LENGTHS.get(column, len(text))
    if len(text) <= length:
        return text
    return "" if column in _DATE_TIME_COLUMNS else text[:length]
