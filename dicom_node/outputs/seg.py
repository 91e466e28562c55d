"""DICOM-SEG of the node's lesions, written with highdicom.

BINARY, one segment per lesion ("Liver tumor 1", "Liver tumor 2", ...), SNOMED CT coded category and type,
algorithm identification (name, version, family Artificial Intelligence), references to every source
instance and the frame of reference (highdicom derives both from the source images), empty frames omitted,
the patient and study of the source, and a new series with a stable UID. A pure function: data in, data out.
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.valuerep import DA, TM

from dicom_node import __version__
from dicom_node.outputs.codes import codes_for
from dicom_node.outputs.uids import output_uids, tracking_uid
from inference.findings import Lesion
from inference.slicing import Volume

SERIES_NUMBER = 9901
# Type 2 attributes highdicom copies from the source; PACS often send instances without them.
_TYPE2_DEFAULTS = {
    "PatientName": "", "PatientID": "", "PatientBirthDate": "", "PatientSex": "", "StudyDate": "", "StudyTime": "",
    "ReferringPhysicianName": "", "AccessionNumber": "", "StudyID": "", "Manufacturer": "",
}

# Type 2 dates and times that highdicom parses: a malformed one in a source ("1980-01-01") would fail the job
# with the value in its error; the copy gets it empty, which type 2 allows.
_TYPE2_PARSED = {"PatientBirthDate": DA, "StudyDate": DA, "StudyTime": TM}


@dataclass(frozen=True)
class AlgorithmInfo:
    name: str
    version: str


class OutputError(ValueError):
    """The results cannot be written as DICOM for these sources (with the reason)."""


def segment_labels(lesions: list[Lesion]) -> list[str]:
    """"Liver tumor 1", "Liver tumor 2", "Lung nodule 1": numbered per label, in the lesions' order."""
    counts: dict[str, int] = {}
    labels = []
    for lesion in lesions:
        counts[lesion.label] = counts.get(lesion.label, 0) + 1
        labels.append(f"{lesion.label} {counts[lesion.label]}")
    return labels


def build_seg(sources: list[Dataset], volume: Volume, lesions: list[Lesion], algorithm: AlgorithmInfo,
              run: int = 1) -> hd.seg.Segmentation:
    """The SEG for ``lesions`` found on ``volume``; ``sources`` are the series' instances (any order);
    ``run`` numbers the interpretation of the series (see output_uids)."""
    if not lesions:
        raise OutputError("a SEG needs at least one lesion; a series without findings gets an SR only")
    ordered = sources_with_type2(sources, volume)
    pixels = _segment_array(lesions)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=codes_for(lesion.label).category,
            segmented_property_type=codes_for(lesion.label).property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=hd.AlgorithmIdentificationSequence(
                name=algorithm.name, version=algorithm.version, family=hd.sr.CodedConcept("123110", "DCM", "Artificial Intelligence")),
            tracking_uid=tracking_uid(volume.series_instance_uid, algorithm.version, number, run),
            tracking_id=label,
        )
        for number, (label, lesion) in enumerate(zip(segment_labels(lesions), lesions), start=1)
    ]
    series_uid, sop_uid = output_uids(volume.series_instance_uid, algorithm.version, "SEG", run)
    return hd.seg.Segmentation(
        source_images=ordered,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=sop_uid,
        instance_number=run,
        manufacturer="dicom-node",
        manufacturer_model_name=algorithm.name,
        software_versions=f"dicom-node {__version__}; model {algorithm.version}",
        device_serial_number="0",
        series_description=f"AI findings ({algorithm.name} {algorithm.version}) - not for diagnosis"[:64],
        omit_empty_frames=True,
    )


def _segment_array(lesions: list[Lesion]) -> np.ndarray:
    """A (slices, rows, columns) label map of segment numbers when no two lesions share a voxel (the usual
    case: highdicom's overlap check of a 4D stack alone took 1.7 s for 300 slices), else the 4D stack."""
    labels = np.zeros(lesions[0].mask.shape, dtype=np.uint16)
    for number, lesion in enumerate(lesions, start=1):
        if labels[lesion.mask].any():
            return np.stack([lesion.mask for lesion in lesions], axis=-1)  # (slices, rows, columns, segments)
        labels[lesion.mask] = number
    return labels


def _copy(ds: Dataset) -> Dataset:
    """A new data set with the same elements (element objects shared, not copied): attributes added to it
    do not appear in the caller's data set. A deep copy cost 0.5 s for 300 sources."""
    copied = Dataset()
    copied.update(ds)
    copied.file_meta = getattr(ds, "file_meta", Dataset())
    return copied


def sources_with_type2(sources: list[Dataset], volume: Volume) -> list[Dataset]:
    """Copies of the source instances in the volume's slice order, with missing type 2 attributes added and
    malformed type 2 dates and times emptied."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}
    if any(ref.frame_number is not None for ref in volume.sources):
        raise OutputError("SEG for multi-frame sources is not supported yet")
    try:
        ordered = [_copy(by_uid[ref.sop_instance_uid]) for ref in volume.sources]
    except KeyError as exc:
        raise OutputError(f"source instance {exc.args[0]} of the volume was not given") from None
    for ds in ordered:
        for keyword, value in _TYPE2_DEFAULTS.items():
            if keyword not in ds:
                setattr(ds, keyword, value)
        for keyword, parse in _TYPE2_PARSED.items():
            if ds[keyword].value:
                try:
                    parse(ds[keyword].value)
                except (ValueError, TypeError):  # TypeError: several values where one is allowed
                    delattr(ds, keyword)  # a new element: the one there is the caller's (see _copy)
                    setattr(ds, keyword, "")
        if "SliceThickness" not in ds:
            ds.SliceThickness = float(volume.spacing[2])
    return ordered
