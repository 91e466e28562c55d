"""Real head anatomy for the synthetic MRI data: Colin27 (Debian's mricron-data) and the MNI152 template
(inside the nilearn wheel), each with a brain mask, as (z, y, x) arrays in LPS order with 1 mm voxels."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

MRICRON = Path("/usr/share/mricron/templates")


class AnatomyMissingError(FileNotFoundError):
    """A template is not installed (`make install` installs mricron-data and nilearn)."""


@dataclass(frozen=True)
class Head:
    name: str
    image: np.ndarray  # (z, y, x) float32, z from feet to head, y anterior to posterior, x right to left
    brain: np.ndarray  # (z, y, x) bool
    spacing_mm: float = 1.0


def _read(path: Path) -> np.ndarray:
    if not path.is_file():
        raise AnatomyMissingError(f"{path} is missing (apt-get install mricron-data; pip install nilearn)")
    return sitk.GetArrayFromImage(sitk.DICOMOrient(sitk.ReadImage(str(path)), "LPS")).astype(np.float32)


def colin27() -> Head:
    """Colin Holmes' 27-average T1 head (the ch2 template) and its brain (ch2bet, AAL labels)."""
    image = _read(MRICRON / "ch2.nii.gz")
    brain = (_read(MRICRON / "ch2bet.nii.gz") > 0) | (_read(MRICRON / "aal.nii.gz") > 0)
    return Head("Colin27", image, brain)


def mni152() -> Head:
    """The ICBM 2009a symmetric T1 template and its brain (grey + white matter probability > 0.5)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise AnatomyMissingError("nilearn is not installed (pip install nilearn)")
    data = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    image = _read(data / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz")
    grey = _read(data / "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz")
    white = _read(data / "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz")
    scale = 255.0 if max(grey.max(), white.max()) > 1.5 else 1.0
    return Head("MNI152", image, (grey + white) / scale > 0.5)


HEADS = {"Colin27": colin27, "MNI152": mni152}
