"""Reading stored instances into frames: the I/O edge of the slicing pipeline.

A :class:`Frame` is one 2D image plane with its own geometry, whatever it came from: a classic single-frame
CT or MR instance, or one frame of an Enhanced / Legacy Converted Enhanced multi-frame object (geometry from
the per-frame or shared functional groups). Pixel data is decoded by pydicom (compressed transfer syntaxes
through the pylibjpeg plugins) and mapped through the Modality LUT (rescale slope and intercept) for CT;
MR values are kept as stored, as the issue asks.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError


class SlicingError(ValueError):
    """A series the pipeline will not turn into a volume, with the reason."""


@dataclass(frozen=True)
class Frame:
    """One image plane: ``pixels`` (rows, columns) as stored; ``values()`` in modality units."""

    pixels: np.ndarray
    sop_instance_uid: str
    frame_number: int | None  # 1-based for multi-frame objects, None for single-frame instances
    position: np.ndarray  # Image Position (Patient), LPS mm, of the first transmitted pixel
    row_direction: np.ndarray  # unit vector along a row (increasing column index), LPS
    column_direction: np.ndarray  # unit vector down a column (increasing row index), LPS
    spacing: tuple[float, float]  # (between rows, between columns) in mm
    modality: str
    frame_of_reference_uid: str
    series_instance_uid: str
    is_localizer: bool = False
    stack_key: str = ""  # temporal position / echo / stack ID: what tells phases apart
    slope: float = 1.0  # Modality LUT, applied for CT only (MR is kept as stored)
    intercept: float = 0.0

    def values_into(self, out: np.ndarray) -> None:
        """Write the frame in modality units into ``out`` (float32, same shape) without a temporary."""
        np.multiply(self.pixels, np.float32(self.slope), out=out, casting="unsafe")
        if self.intercept:
            out += np.float32(self.intercept)

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_direction, self.column_direction)


def read_frames(paths: list[Path], threads: int = 2) -> list[Frame]:
    """All frames of all instances; raises SlicingError naming the file that cannot be read."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        per_file = list(pool.map(_read_file, paths))
    return [frame for frames in per_file for frame in frames]


def _read_file(path: Path) -> list[Frame]:
    try:
        ds = dcmread(path)
    except (InvalidDicomError, OSError, EOFError) as exc:
        raise SlicingError(f"{path.name}: not readable as DICOM: {exc}") from None
    if "PixelData" not in ds:
        raise SlicingError(f"{path.name}: has no pixel data")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise SlicingError(f"{path.name}: colour images are not CT or MR slices")
    try:
        pixels = decode_pixels(ds)
    except Exception as exc:  # noqa: BLE001 - decoders raise many types; the reason is what matters
        raise SlicingError(f"{path.name}: pixel data cannot be decoded ({ds.file_meta.TransferSyntaxUID}): {exc}") from None
    if "PerFrameFunctionalGroupsSequence" in ds:
        return _multi_frame(ds, pixels)
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise SlicingError(f"{path.name}: multi-frame object without functional groups: no per-frame geometry")
    return [_frame(ds, ds, pixels[0], None)]


def decode_pixels(ds: Dataset) -> np.ndarray:
    """Stored pixel values as (frames, rows, columns), whatever the transfer syntax."""
    pixels = _native_pixels(ds)
    if pixels is None:
        pixels = ds.pixel_array
    return pixels.reshape(-1, int(ds.Rows), int(ds.Columns))


_NATIVE_LITTLE_ENDIAN = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}


def _native_pixels(ds: Dataset) -> np.ndarray | None:
    """Uncompressed little-endian pixels as a view on the file's bytes (pydicom's decoder framework costs
    more than reading the file); None where pydicom must decode (compressed, odd bit depths)."""
    if ds.file_meta.get("TransferSyntaxUID") not in _NATIVE_LITTLE_ENDIAN:
        return None
    bits, stored, signed = int(ds.BitsAllocated), int(ds.get("BitsStored", ds.BitsAllocated)), int(ds.PixelRepresentation)
    if bits not in (8, 16, 32) or (signed and stored != bits):
        return None
    dtype = np.dtype(f"{'i' if signed else 'u'}{bits // 8}").newbyteorder("<")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    count = frames * int(ds.Rows) * int(ds.Columns)
    data = np.frombuffer(ds.PixelData, dtype=dtype, count=count)
    if not signed and stored < bits:
        data = data & np.array((1 << stored) - 1, dtype=dtype)
    shape = (frames, ds.Rows, ds.Columns) if frames > 1 else (ds.Rows, ds.Columns)
    return data.reshape(shape)


def _multi_frame(ds: Dataset, pixels: np.ndarray) -> list[Frame]:
    shared = ds.get("SharedFunctionalGroupsSequence", [Dataset()])[0]
    frames = []
    for index, per_frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        groups = _merged_groups(shared, per_frame)
        frames.append(_frame(ds, groups, pixels[index], index + 1))
    return frames


def _merged_groups(shared: Dataset, per_frame: Dataset) -> Dataset:
    """The functional group macros of one frame: per-frame values override shared ones."""
    merged = Dataset()
    for source in (shared, per_frame):
        for element in source:
            if element.VR == "SQ" and len(element.value):
                merged[element.tag] = element
    flat = Dataset()
    for element in merged:
        for item_element in element.value[0]:
            flat[item_element.tag] = item_element
    return flat


def _frame(ds: Dataset, geometry: Dataset, pixels: np.ndarray, frame_number: int | None) -> Frame:
    name = f"{ds.SOPInstanceUID}" + (f" frame {frame_number}" if frame_number else "")
    try:
        orientation = np.asarray(geometry.ImageOrientationPatient, dtype=np.float64)
        position = np.asarray(geometry.ImagePositionPatient, dtype=np.float64)
        spacing = tuple(float(v) for v in geometry.PixelSpacing)
    except AttributeError as exc:
        raise SlicingError(f"{name}: no plane geometry ({exc.args[0]})") from None
    row, column = _unit(orientation[:3], name), _unit(orientation[3:], name)
    modality = str(ds.get("Modality", ""))
    slope, intercept = 1.0, 0.0
    if modality == "CT":
        slope = float(geometry.get("RescaleSlope", ds.get("RescaleSlope", 1.0)) or 1.0)
        intercept = float(geometry.get("RescaleIntercept", ds.get("RescaleIntercept", 0.0)) or 0.0)
    image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
    return Frame(
        pixels=pixels,
        sop_instance_uid=str(ds.SOPInstanceUID),
        frame_number=frame_number,
        position=position,
        row_direction=row,
        column_direction=column,
        spacing=(spacing[0], spacing[1]),
        modality=modality,
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        is_localizer="LOCALIZER" in image_type,
        stack_key=_stack_key(ds, geometry),
        slope=slope,
        intercept=intercept,
    )


def _stack_key(ds: Dataset, geometry: Dataset) -> str:
    """Values that separate the phases of a multi-phase series (which share slice positions)."""
    parts = [
        geometry.get("TemporalPositionIndex", ds.get("TemporalPositionIdentifier")),
        ds.get("EchoNumbers"),
        geometry.get("StackID"),
    ]
    return "/".join("" if p is None else str(p) for p in parts)


def _unit(vector: np.ndarray, name: str) -> np.ndarray:
    norm = float(np.linalg.norm(vector))
    if not 0.9 < norm < 1.1:
        raise SlicingError(f"{name}: Image Orientation (Patient) is not made of unit vectors")
    return vector / norm
