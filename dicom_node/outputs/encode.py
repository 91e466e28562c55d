"""A data set as the bytes of a C-STORE (no file meta), so the node files its own results like received ones."""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian


def encode(dataset: Dataset) -> tuple[bytes, str]:
    """(encoded data set, transfer syntax UID); in the file meta's syntax, explicit VR little endian if none."""
    meta = getattr(dataset, "file_meta", None)
    syntax = str(meta.TransferSyntaxUID) if meta is not None and "TransferSyntaxUID" in meta else ExplicitVRLittleEndian
    buffer = DicomBytesIO()
    buffer.is_little_endian = syntax != "1.2.840.10008.1.2.2"
    buffer.is_implicit_VR = syntax == "1.2.840.10008.1.2"
    write_dataset(buffer, dataset)
    return buffer.getvalue(), syntax
