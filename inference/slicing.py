"""One series of stored instances to a :class:`Volume`: the only path from DICOM to model input.

Inference and training both call :func:`load_series`. What it does with what PACS really send:

- Frames are ordered along the slice normal by Image Position (Patient), never by Instance Number.
- Localisers (ImageType LOCALIZER, or frames whose orientation differs from the main stack's) are dropped.
- Several stacks in one series (other orientations, or phases told apart by temporal position, echo or
  stack ID) are split: :func:`load_stacks` returns each; :func:`load_series` refuses with
  :class:`MultipleStacksError` naming them, so a caller never interprets a mix by accident.
- Duplicate positions within one stack keep the first frame and are counted on the volume.
- Missing slices and uneven spacing are flagged (``Volume.issues``); the voxels keep the true positions
  (``slice_positions``) so measurements use real geometry.
- Gantry tilt (slices offset along a direction that is not the normal) is refused with
  :class:`GantryTiltError`: resampling a tilted acquisition would move lesions by millimetres without the
  reader knowing.

Axis order of ``Volume.voxels`` is (z, y, x) = (slice, row, column); geometry is in LPS millimetres.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from inference.frames import Frame, SlicingError, read_frames

ORIENTATION_TOLERANCE = 1e-3  # of direction cosines: same stack when closer than this
TILT_TOLERANCE_DEG = 0.5
SPACING_TOLERANCE = 0.05  # relative: spacings within 5 % of the median are "even"


class MultipleStacksError(SlicingError):
    def __init__(self, stacks: list[str]) -> None:
        self.stacks = stacks
        super().__init__(f"series holds {len(stacks)} stacks ({'; '.join(stacks)}); use load_stacks to take them apart")


class GantryTiltError(SlicingError):
    pass


@dataclass(frozen=True)
class SliceRef:
    """The source of one slice: the instance and, for multi-frame objects, the 1-based frame number."""

    sop_instance_uid: str
    frame_number: int | None = None


@dataclass
class SeriesIssues:
    """What was odd about the series; nothing here stops interpretation, all of it is reported."""

    localizers_dropped: int = 0
    duplicate_positions: int = 0
    missing_slices: int = 0
    uneven_spacing: bool = False

    def describe(self) -> list[str]:
        notes = []
        if self.localizers_dropped:
            notes.append(f"{self.localizers_dropped} localiser frame(s) dropped")
        if self.duplicate_positions:
            notes.append(f"{self.duplicate_positions} frame(s) at duplicate positions dropped")
        if self.missing_slices:
            notes.append(f"about {self.missing_slices} slice(s) missing")
        if self.uneven_spacing:
            notes.append("uneven slice spacing")
        return notes


@dataclass
class Volume:
    """Voxels in modality units (CT: HU; MR: stored values), shape (z, y, x), float32, with its geometry.

    ``origin`` is the LPS position of voxel (0, 0, 0); ``direction`` is 3x3 with columns (x, y, z) axis
    directions as SimpleITK orders them; ``spacing`` is (x, y, z) mm with z the median slice spacing;
    ``slice_positions`` are the distances of each slice along the normal, which stay true when spacing is
    uneven.
    """

    voxels: np.ndarray
    origin: np.ndarray
    spacing: tuple[float, float, float]
    direction: np.ndarray
    slice_positions: np.ndarray
    frame_of_reference_uid: str
    modality: str
    series_instance_uid: str
    sources: list[SliceRef]
    issues: SeriesIssues = field(default_factory=SeriesIssues)

    @property
    def normal(self) -> np.ndarray:
        return self.direction[:, 2]

    def to_sitk(self) -> sitk.Image:
        """The volume as a SimpleITK image (SimpleITK orders axes x, y, z; numpy here is z, y, x)."""
        image = sitk.GetImageFromArray(self.voxels)
        image.SetOrigin(tuple(float(v) for v in self.origin))
        image.SetSpacing(tuple(float(v) for v in self.spacing))
        image.SetDirection(tuple(float(v) for v in self.direction.flatten()))
        return image

    def slice_origin(self, k: int) -> np.ndarray:
        """LPS position of the first pixel of slice k (its Image Position (Patient))."""
        return self.origin + self.normal * (self.slice_positions[k] - self.slice_positions[0])

    def slice_index_at(self, position: np.ndarray, tolerance_mm: float | None = None) -> int | None:
        """The slice whose plane passes through ``position`` (within half a slice spacing), or None."""
        distance = float(np.dot(position, self.normal))
        k = int(np.argmin(np.abs(self.slice_positions - distance)))
        limit = tolerance_mm if tolerance_mm is not None else max(self.spacing[2] / 2, 1e-3)
        return k if abs(self.slice_positions[k] - distance) <= limit else None


def load_series(paths: list[Path]) -> Volume:
    """The single stack of a series; MultipleStacksError if the series holds several."""
    volumes = load_stacks(paths)
    if len(volumes) > 1:
        raise MultipleStacksError([_describe(v) for v in volumes])
    return volumes[0]


def load_stacks(paths: list[Path]) -> list[Volume]:
    """Every stack of a series as its own Volume, the largest first."""
    if not paths:
        raise SlicingError("no instances given")
    return assemble(read_frames(list(paths)))


def assemble(frames: list[Frame]) -> list[Volume]:
    """Pure part of the pipeline: frames to volumes (see the module docstring for the rules)."""
    if not frames:
        raise SlicingError("the series has no image frames")
    stacks = _split(frames)
    main_orientation = max(stacks.values(), key=len)[0]
    localizers = [f for f in frames if f.is_localizer]
    volumes = []
    for key, members in stacks.items():
        members = [f for f in members if not f.is_localizer]
        if not members:
            continue
        if len(members) == 1 and len(stacks) > 1 and not _same_orientation(members[0], main_orientation):
            localizers.extend(members)  # a lone frame across the main stack: a localiser in all but name
            continue
        volumes.append(_volume(members))
    if not volumes:
        raise SlicingError("the series holds only localiser images")
    for volume in volumes:
        volume.issues.localizers_dropped = len(localizers)
    return sorted(volumes, key=lambda v: -len(v.sources))


def _split(frames: list[Frame]) -> dict[tuple, list[Frame]]:
    stacks: dict[tuple, list[Frame]] = defaultdict(list)
    for frame in frames:
        orientation = tuple(np.round(np.concatenate([frame.row_direction, frame.column_direction]), 3))
        key = (orientation, frame.pixels.shape, np.round(frame.spacing, 4).tobytes(), frame.stack_key)
        stacks[key].append(frame)
    return stacks


def _same_orientation(a: Frame, b: Frame) -> bool:
    return bool(np.allclose(a.row_direction, b.row_direction, atol=ORIENTATION_TOLERANCE)
                and np.allclose(a.column_direction, b.column_direction, atol=ORIENTATION_TOLERANCE))


def _volume(frames: list[Frame]) -> Volume:
    first = frames[0]
    normal = first.normal
    distances = np.array([float(np.dot(f.position, normal)) for f in frames])
    order = np.argsort(distances, kind="stable")
    frames = [frames[i] for i in order]
    distances = distances[order]
    keep = np.concatenate([[True], np.diff(distances) > 1e-3])
    duplicates = int((~keep).sum())
    frames = [f for f, k in zip(frames, keep) if k]
    distances = distances[keep]
    _check_tilt(frames, normal)
    issues = SeriesIssues(duplicate_positions=duplicates)
    slice_spacing = _slice_spacing(distances, issues)
    direction = np.column_stack([first.row_direction, first.column_direction, normal])
    voxels = np.empty((len(frames), *first.pixels.shape), dtype=np.float32)
    for k, frame in enumerate(frames):
        frame.values_into(voxels[k])
    return Volume(
        voxels=voxels,
        origin=frames[0].position.copy(),
        spacing=(first.spacing[1], first.spacing[0], slice_spacing),
        direction=direction,
        slice_positions=distances,
        frame_of_reference_uid=first.frame_of_reference_uid,
        modality=first.modality,
        series_instance_uid=first.series_instance_uid,
        sources=[SliceRef(f.sop_instance_uid, f.frame_number) for f in frames],
        issues=issues,
    )


def _check_tilt(frames: list[Frame], normal: np.ndarray) -> None:
    if len(frames) < 2:
        return
    step = frames[-1].position - frames[0].position
    length = float(np.linalg.norm(step))
    if length < 1e-6:
        return
    angle = np.degrees(np.arccos(min(1.0, abs(float(np.dot(step / length, normal))))))
    if angle > TILT_TOLERANCE_DEG:
        raise GantryTiltError(f"slices are offset {angle:.1f} degrees from their normal (gantry tilt); not resampled")


def _slice_spacing(distances: np.ndarray, issues: SeriesIssues) -> float:
    if len(distances) < 2:
        return 1.0
    gaps = np.diff(distances)
    median = float(np.median(gaps))
    uneven = np.abs(gaps - median) > SPACING_TOLERANCE * median
    issues.uneven_spacing = bool(uneven.any())
    issues.missing_slices = int(np.sum(np.maximum(np.round(gaps / median) - 1, 0)))
    return median


def _describe(volume: Volume) -> str:
    rows, columns = volume.voxels.shape[1:]
    return f"{len(volume.sources)} x {rows}x{columns} normal {np.round(volume.normal, 2).tolist()}"
