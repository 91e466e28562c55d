"""Writes a synthetic CT series (CT Image Storage, 512x512 int16, explicit VR little endian) for benchmarks.

Pixel content is a noisy ellipse in Hounsfield-like values; the headers are complete enough for PACS
(Orthanc, DCMTK) and for the node's index. Usage: python -m benchmarks.ct_series OUT_DIR [--slices 300]
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from pydicom.dataset import FileMetaDataset
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


def write_ct_series(out_dir: Path, slices: int = 300, size: int = 512, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    body = ((yy - size / 2) / (size * 0.35)) ** 2 + ((xx - size / 2) / (size * 0.45)) ** 2 <= 1
    images = (np.where(body, 40, -1000).astype(np.int16) + rng.normal(0, 10, (size, size)).astype(np.int16)
              for _ in range(slices))
    return write_ct_slices(out_dir, images, field_of_view_mm=500.0)


def write_ct_slices(out_dir: Path, images: Iterable[np.ndarray], field_of_view_mm: float,
                    description: str = "Benchmark axial") -> list[Path]:
    """One CT file per (size, size) image of Hounsfield units; 1 mm slices, one new study and series."""
    out_dir.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for k, hu in enumerate(images):
        ds = _ct_dataset(study, series, frame, k, hu.shape[0], field_of_view_mm)
        ds.SeriesDescription = description
        ds.PixelData = (np.clip(hu, -1024, 3071) + 1024).astype(np.uint16).tobytes()
        path = out_dir / f"CT{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _ct_dataset(study: str, series: str, frame: str, k: int, size: int, field_of_view_mm: float) -> Dataset:
    sop = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "BENCH^CT", "BENCH001", "19700101", "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = "20260101", "120000", "ACC001", "1"
    ds.ReferringPhysicianName, ds.StudyDescription = "", "Benchmark CT"
    ds.Modality, ds.SeriesNumber, ds.SeriesDescription, ds.BodyPartExamined = "CT", 1, "Benchmark axial", "ABDOMEN"
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [-field_of_view_mm / 2, -field_of_view_mm / 2, -k * 1.0]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.SliceThickness, ds.PixelSpacing = 1.0, [field_of_view_mm / size] * 2
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.KVP, ds.ImageType = 120, ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.Manufacturer = "dicom-node benchmark"
    return ds


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--slices", type=int, default=300)
    args = parser.parse_args()
    print(len(write_ct_series(args.out_dir, args.slices)), "files in", args.out_dir)
