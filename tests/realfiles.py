"""The real DICOM files the tests use: pydicom's own test files and the pydicom-data package.

Listed from their folders, never through ``pydicom.data.get_testdata_files``, which would try to download
files that are not installed.
"""

from __future__ import annotations

from pathlib import Path

import data_store
import pydicom


def real_dicom_files() -> list[Path]:
    folders = [Path(pydicom.__file__).parent / "data" / "test_files", Path(data_store.__file__).parent / "data"]
    return sorted(p for folder in folders for p in folder.rglob("*") if p.is_file() and p.suffix != ".py")


def real_file(name: str) -> Path:
    matches = [p for p in real_dicom_files() if p.name == name]
    if not matches:
        raise FileNotFoundError(f"{name} is in neither pydicom's test files nor pydicom-data")
    return matches[0]
