"""Synthetic studies as what the node receives: an axial DICOM series plus a ground-truth DICOM-SEG.

Training reads every source, synthetic ones included, as DICOM through ``inference.slicing``; so the
synthetic data are written the way a scanner and an annotation tool would write them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, MRImageStorage, generate_uid

from dicom_node.outputs.codes import codes_for

SYNTHETIC_ALGORITHM = hd.AlgorithmIdentificationSequence(
    name="dicom-node synthetic ground truth", version="1", family=hd.sr.CodedConcept("123109", "DCM", "Manual Processing"))


@dataclass(frozen=True)
class SeriesHeader:
    """Who and what the series is: the patient is the training "subject" (splits never cut through one)."""

    patient_id: str
    modality: str
    description: str = "Axial"
    body_part: str = ""
    study_date: str = "20260101"


def write_series(folder: Path, images: Iterable[np.ndarray], header: SeriesHeader, pixel_mm: float,
                 slice_mm: float) -> list[Path]:
    """One file per (rows, columns) slice, first slice lowest (feet first), LPS axial geometry; CT in HU."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for k, image in enumerate(images):
        ds = _slice_dataset(header, study, series, frame, k, image.shape, pixel_mm, slice_mm)
        if header.modality == "CT":
            stored = np.clip(np.round(image), -1024, 3071) + 1024
        else:
            stored = np.clip(np.round(image), 0, 4095)
        ds.PixelData = stored.astype(np.uint16).tobytes()
        path = folder / f"{header.modality}{k:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def _slice_dataset(header: SeriesHeader, study: str, series: str, frame: str, k: int, shape: tuple[int, int],
                   pixel_mm: float, slice_mm: float) -> Dataset:
    sop = generate_uid()
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage if header.modality == "CT" else MRImageStorage
    ds.SOPInstanceUID = sop
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = f"SYNTHETIC^{header.patient_id}", header.patient_id, "", "O"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.StudyID = header.study_date, "120000", "", "1"
    ds.ReferringPhysicianName, ds.StudyDescription = "", "Synthetic study"
    ds.Modality, ds.SeriesNumber, ds.SeriesDescription = header.modality, 1, header.description
    ds.BodyPartExamined = header.body_part
    ds.Manufacturer = "dicom-node synthetic"
    ds.InstanceNumber = k + 1
    rows, columns = shape
    ds.ImagePositionPatient = [-columns * pixel_mm / 2, -rows * pixel_mm / 2, k * slice_mm]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.SliceThickness, ds.SpacingBetweenSlices, ds.PixelSpacing = slice_mm, slice_mm, [pixel_mm, pixel_mm]
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    if header.modality == "CT":
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType, ds.KVP = -1024, 1, "HU", 120
    else:
        ds.MagneticFieldStrength, ds.ScanningSequence, ds.SequenceVariant = 1.5, "GR", "SP"
        ds.ScanOptions, ds.MRAcquisitionType, ds.EchoTime, ds.RepetitionTime = "", "3D", 4.0, 2000.0
    return ds


def write_ground_truth(path: Path, sources: list[Path], masks: dict[str, np.ndarray] | list[tuple[str, np.ndarray]]) -> Path:
    """A binary DICOM-SEG of ``masks`` ((z, y, x) bool in the sources' order).

    A dict gives one segment per finding label (an annotation tool's usual export; the evaluation then takes
    each connected component for a lesion). A list of (label, mask) gives one segment per lesion, each with
    its own Tracking ID and Tracking UID, as the node's own SEGs do: the evaluation then knows which parts
    belong to one lesion (a tumour whose satellite lies apart on the 5 mm slices is still one tumour).
    A study without findings still gets its SEG, with its segments empty (every frame written): the record
    that the series was reviewed and found clear, as an annotation tool exports it."""
    tracked = isinstance(masks, list)
    segments = masks if tracked else sorted(masks.items())
    if not segments:
        raise ValueError("name at least one label (an empty mask says it was looked for and not found)")
    datasets = [dcmread(p) for p in sources]
    label_map = np.zeros(segments[0][1].shape, np.uint8)
    for number, (_, mask) in enumerate(segments, start=1):
        label_map[mask] = number  # the synthesis's findings never overlap
    ordinal = {label: 0 for label, _ in segments}
    descriptions = []
    for number, (label, _) in enumerate(segments, start=1):
        ordinal[label] += 1
        tracking = {"tracking_id": f"{label} {ordinal[label]}", "tracking_uid": generate_uid()} if tracked else {}
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=label,
            segmented_property_category=codes_for(label).category, segmented_property_type=codes_for(label).property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL, **tracking,
        ))
    seg = hd.seg.Segmentation(
        source_images=datasets, pixel_array=label_map, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=900,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="dicom-node synthetic",
        manufacturer_model_name="ground truth", software_versions="1", device_serial_number="0",
        series_description="Ground truth", omit_empty_frames=bool(label_map.any()),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path, enforce_file_format=True)
    return path
