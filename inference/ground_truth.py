"""Ground truth from DICOM-SEG, placed on the slices of a :class:`Volume`.

Any writer's SEG (highdicom, dcmqi, a viewer's corrected SEG sent back to the node), BINARY or FRACTIONAL
(a fractional value of at least half the maximum counts as inside). Each frame lands on a slice by the
source instance (and frame) it references; a frame that references only the frame of reference lands by
its Image Position (Patient), which must fall on a slice plane and on the slice's own pixel grid.

Only a segment whose category is an abnormality is a finding: annotation tools (3D Slicer, dcmqi) export the
organ a lesion was drawn in beside it, as Tissue or Anatomical Structure.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import SegmentationStorage

from inference.frames import SlicingError
from inference.slicing import SliceRef, Volume

IN_PLANE_TOLERANCE_MM = 0.5
# Of CID 7150's segmentation property categories only this one is a finding; tissue, anatomical structure,
# physical object, substance, body substance, function and spatial concept are not. SRT M-01000 compares equal.
FINDING_CATEGORY = codes.SCT.MorphologicallyAbnormalStructure


@dataclass(frozen=True)
class Segment:
    """One segment of a SEG on the volume's grid: ``mask`` is (z, y, x) bool."""

    number: int
    label: str
    property_type: str  # the code meaning of SegmentedPropertyTypeCodeSequence, e.g. "Liver"
    mask: np.ndarray
    tracking_uid: str = ""  # TrackingUID: set where the segment is one tracked finding (one lesion), as TID 1500 uses it
    category: Code | None = None  # SegmentedPropertyCategoryCodeSequence, e.g. SCT 49755003; None where absent

    @property
    def is_finding(self) -> bool:
        return is_finding_category(self.category)


def segment_category(item: Dataset) -> Code | None:
    """The SegmentedPropertyCategoryCodeSequence of one SegmentSequence item, None where it has none."""
    sequence = item.get("SegmentedPropertyCategoryCodeSequence")
    if not sequence:
        return None
    code = sequence[0]
    value = code.get("CodeValue") or code.get("LongCodeValue") or code.get("URNCodeValue") or ""
    return Code(str(value), str(code.get("CodingSchemeDesignator", "")), str(code.get("CodeMeaning", "")))


def is_finding_category(category: Code | None) -> bool:
    """Whether a segment of this category is a finding. A segment without one (a Type 1 attribute some writers
    still omit) counts as a finding, as every segment did before categories were read: its SEG is not dropped."""
    return category is None or category == FINDING_CATEGORY


def read_segmentation(source: Path | Dataset, volume: Volume) -> list[Segment]:
    """Every segment of the SEG, placed on ``volume``; raises SlicingError when it cannot be placed."""
    ds = dcmread(source) if isinstance(source, Path) else source
    if str(ds.get("SOPClassUID")) != SegmentationStorage:
        raise SlicingError(f"{ds.get('SOPInstanceUID')}: not a Segmentation (SOP class {ds.get('SOPClassUID')})")
    if (ds.Rows, ds.Columns) != volume.voxels.shape[1:]:
        raise SlicingError(f"SEG frames are {ds.Rows}x{ds.Columns}, the series' slices {volume.voxels.shape[1:]}: not resampled")
    frames = _frames(ds)
    shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    by_source = {ref: k for k, ref in enumerate(volume.sources)}
    by_instance = {ref.sop_instance_uid: k for k, ref in enumerate(volume.sources) if ref.frame_number is None}
    segments = {int(item.SegmentNumber): item for item in ds.SegmentSequence}
    masks = {number: np.zeros(volume.voxels.shape, dtype=bool) for number in segments}
    same_frame = str(ds.get("FrameOfReferenceUID", "")) == volume.frame_of_reference_uid
    unheld = _series_instances(ds, volume.series_instance_uid) - {ref.sop_instance_uid for ref in volume.sources}
    for index, per_frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        number = int(_group(per_frame, shared, "SegmentIdentificationSequence").ReferencedSegmentNumber)
        if number not in masks:
            raise SlicingError(f"SEG frame {index + 1} refers to segment {number}, which the SEG does not describe")
        k = _slice_by_reference(per_frame, shared, by_source, by_instance)
        if k is None:
            _refuse_unheld(per_frame, shared, unheld, volume, index)
            if not same_frame:
                raise SlicingError("SEG frame references no instance of this series and another frame of reference")
            k = _slice_by_position(per_frame, shared, volume)
        masks[number][k] |= frames[index]
    return [
        Segment(number, str(item.get("SegmentLabel", f"Segment {number}")), _type_meaning(item), masks[number],
                str(item.get("TrackingUID", "")), segment_category(item))
        for number, item in sorted(segments.items())
    ]


def _frames(ds: Dataset) -> np.ndarray:
    pixels = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    if ds.SegmentationType == "FRACTIONAL":
        return pixels >= (int(ds.MaximumFractionalValue) + 1) // 2
    return pixels.astype(bool)


def _group(per_frame: Dataset, shared: Dataset, name: str) -> Dataset:
    for groups in (per_frame, shared):
        if name in groups and len(groups[name].value):
            return groups[name].value[0]
    raise SlicingError(f"SEG frame has no {name}")


def _slice_by_reference(per_frame: Dataset, shared: Dataset, by_source: dict[SliceRef, int],
                        by_instance: dict[str, int]) -> int | None:
    for groups in (per_frame, shared):
        for derivation in groups.get("DerivationImageSequence", []):
            for source in derivation.get("SourceImageSequence", []):
                uid = str(source.ReferencedSOPInstanceUID)
                frames = source.get("ReferencedFrameNumber")
                frame = int(frames[0] if isinstance(frames, (list, MultiValue)) else frames) if frames else None
                # A frame number on a single-frame source (often "1") still names that instance; slice 0 is found.
                k = by_source.get(SliceRef(uid, frame)) if frame else None
                if k is None:
                    k = by_instance.get(uid)
                if k is not None:
                    return k
    return None


def _series_instances(ds: Dataset, series_uid: str) -> set[str]:
    """The instances of ``series_uid`` that the SEG says it was drawn on (its Referenced Series Sequence)."""
    return {str(instance.ReferencedSOPInstanceUID) for series in ds.get("ReferencedSeriesSequence", [])
            if str(series.get("SeriesInstanceUID", "")) == series_uid
            for instance in series.get("ReferencedInstanceSequence", [])}


def _refuse_unheld(per_frame: Dataset, shared: Dataset, unheld: set[str], volume: Volume, index: int) -> None:
    """A frame drawn on an instance of this series that the volume dropped (a duplicate position, a localiser) must
    not land by position: the slice kept there holds other pixels."""
    for groups in (per_frame, shared):
        for derivation in groups.get("DerivationImageSequence", []):
            for source in derivation.get("SourceImageSequence", []):
                uid = str(source.ReferencedSOPInstanceUID)
                if uid in unheld:
                    raise SlicingError(f"SEG frame {index + 1} was drawn on instance {uid} of this series, which the "
                                       f"volume does not hold ({_dropped_role(volume)}): not moved to another slice")


def _dropped_role(volume: Volume) -> str:
    roles = [role for role, count in (("a slice at a duplicate position", volume.issues.duplicate_positions),
                                      ("a localiser", volume.issues.localizers_dropped)) if count]
    return f"dropped as {' or '.join(roles)}" if roles else "not among the files read"


def _slice_by_position(per_frame: Dataset, shared: Dataset, volume: Volume) -> int:
    position = np.asarray(_group(per_frame, shared, "PlanePositionSequence").ImagePositionPatient, dtype=np.float64)
    k = volume.slice_index_at(position)
    if k is None:
        raise SlicingError(f"SEG frame at {position.tolist()} lies on no slice of the series")
    offset = position - volume.slice_origin(k)
    if np.linalg.norm(offset) > IN_PLANE_TOLERANCE_MM:
        raise SlicingError(f"SEG frame at {position.tolist()} is offset {np.linalg.norm(offset):.2f} mm in-plane from slice {k}")
    return k


def _type_meaning(item: Dataset) -> str:
    codes = item.get("SegmentedPropertyTypeCodeSequence")
    return str(codes[0].CodeMeaning) if codes else ""
