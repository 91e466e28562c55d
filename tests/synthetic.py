"""Small DICOM series written by pydicom, with every geometric oddity a PACS sends under the tests' control."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid


def write_slices(folder: Path, positions: Sequence[Sequence[float]], *, modality: str = "CT", rows: int = 32,
                 columns: int = 24, spacing: tuple[float, float] = (0.8, 0.6),
                 orientation: Sequence[float] = (1, 0, 0, 0, 1, 0), instance_numbers: Sequence[int] | None = None,
                 sop_uids: Sequence[str] | None = None, series_uid: str | None = None,
                 frame_of_reference: str | None = None, image_types: Sequence[Sequence[str]] | None = None,
                 temporal: Sequence[int | None] | None = None, seed: int = 0) -> list[Path]:
    """One file per position; pixel values encode the slice index (value = 100 * k + noise-free ramp)."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = series_uid or generate_uid()
    frame_of_reference = frame_of_reference or generate_uid()
    study_uid = generate_uid()
    paths = []
    for k, position in enumerate(positions):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = CTImageStorage if modality == "CT" else MRImageStorage
        ds.SOPInstanceUID = sop_uids[k] if sop_uids else generate_uid()
        ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_of_reference
        ds.PatientID, ds.PatientName, ds.Modality = "SYN", "SYNTHETIC^SERIES", modality
        ds.InstanceNumber = instance_numbers[k] if instance_numbers else k + 1
        ds.ImagePositionPatient = [float(v) for v in position]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.PixelSpacing = [spacing[0], spacing[1]]
        ds.ImageType = list(image_types[k]) if image_types else ["ORIGINAL", "PRIMARY", "AXIAL"]
        if temporal and temporal[k] is not None:
            ds.TemporalPositionIdentifier = temporal[k]
        ds.Rows, ds.Columns = rows, columns
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        if modality == "CT":
            ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        pixels = (np.full((rows, columns), 100 * k, dtype=np.int16) + np.arange(columns, dtype=np.int16)[None, :])
        ds.PixelData = pixels.tobytes()
        path = folder / f"{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def axial_positions(n: int, step: float = 2.0, start: float = -10.0) -> list[list[float]]:
    return [[-10.0, -20.0, start + step * k] for k in range(n)]


def toy_ct_images(pattern: str) -> list[np.ndarray]:
    """256x256 CT slices (HU) that the tiny test model (conftest ``trained``) was taught: "F" a slice with its two
    findings (a lung nodule, a kidney tumour), "-" a slice with no findings. In the soft-tissue window they give
    exactly the model's training images."""
    images = []
    for kind in pattern:
        if kind == "F":
            hu = np.full((256, 256), -1000, np.int16)  # air: 0.0 in the window
            hu[30:70, 30:70] = 240  # 1.0
            hu[180:220, 160:230] = 160  # 0.8
        else:
            hu = np.full((256, 256), -40, np.int16)  # 0.3
        images.append(hu)
    return images


def write_toy_ct(folder: Path, pattern: str = "-FFF--", description: str = "Toy axial") -> list[Path]:
    from benchmarks.ct_series import write_ct_slices

    return write_ct_slices(folder, toy_ct_images(pattern), field_of_view_mm=256.0, description=description)


def write_legacy_enhanced_mr(folder: Path, count: int, **slice_options: int) -> tuple[list[Path], Path]:
    """``count`` single-frame MR slices and the Legacy Converted Enhanced MR image made of them (highdicom):
    (the single-frame files, the multi-frame file)."""
    import highdicom as hd
    from pydicom import dcmread

    singles = write_slices(folder / "mr", axial_positions(count, step=3.0), modality="MR", **slice_options)
    datasets = [dcmread(p) for p in singles]
    for ds in datasets:
        ds.StudyDate, ds.StudyTime, ds.SeriesNumber, ds.Manufacturer = "20260101", "120000", 1, "test"
    enhanced = hd.legacy.LegacyConvertedEnhancedMRImage(
        legacy_datasets=datasets, series_instance_uid=hd.UID(), series_number=2, sop_instance_uid=hd.UID(), instance_number=1)
    path = folder / "enhanced.dcm"
    enhanced.save_as(path)
    return singles, path
