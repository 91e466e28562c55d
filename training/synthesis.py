"""Synthetic studies with known lesions: brain tumours placed in real head MRIs, and liver and kidney tumours
and lung nodules in procedurally built CT phantoms. Pure functions of a random generator.

Each returns a :class:`SyntheticStudy`: the voxels of an axial series (MR in stored units, CT in HU), its
geometry, and one ground-truth mask per lesion. Lesions have irregular shapes (a sphere perturbed by
smooth noise), a range of sizes and contrasts, and blurred edges; brain tumours push the tissue around them
aside (mass effect). Slices are thick (5 mm) slabs averaged from 1 mm, so partial volume is real, and a
slice's mask is where the lesion fills at least half the slab. A study may have no lesion at all.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from training.anatomy import Head

SLICE_MM = 5.0


@dataclass
class SyntheticStudy:
    modality: str  # "MR" or "CT"
    body_part: str  # "HEAD", "CHEST", "ABDOMEN"
    voxels: np.ndarray  # (z, y, x) float32: MR signal or CT HU, z from feet to head
    pixel_mm: float
    slice_mm: float
    lesions: list[tuple[str, np.ndarray]] = field(default_factory=list)  # (finding label, (z, y, x) bool), one per lesion
    description: str = ""

    @property
    def masks(self) -> dict[str, np.ndarray]:
        """Finding label -> the union of its lesions' masks (what a slice shows, whichever lesion it is)."""
        union: dict[str, np.ndarray] = {}
        for label, mask in self.lesions:
            union[label] = union[label] | mask if label in union else mask.copy()
        return union


def smooth_noise(shape: tuple[int, ...], rng: np.random.Generator, sigma: float) -> np.ndarray:
    """Zero-mean, unit-variance noise smoothed over ``sigma`` voxels: the low-frequency texture of shapes.
    Wide noise is drawn on a coarser grid and interpolated up (the same texture, a fraction of the work)."""
    factor = max(sigma / 2.0, 1.0)
    coarse = tuple(int(np.ceil(n / factor)) + 1 for n in shape) if factor > 1.0 else tuple(shape)
    field_ = ndimage.gaussian_filter(rng.standard_normal(coarse).astype(np.float32), min(sigma, 2.0))
    if factor > 1.0:
        field_ = ndimage.zoom(field_, [(n + 0.4) / c for n, c in zip(shape, coarse)], order=1, grid_mode=False)
        field_ = np.pad(field_, [(0, max(n - f, 0)) for n, f in zip(shape, field_.shape)], mode="edge")
        field_ = field_[tuple(slice(0, n) for n in shape)]
    return field_ / (field_.std() + 1e-6)


def blob(shape: tuple[int, ...], center: np.ndarray, radius: float, rng: np.random.Generator,
         irregularity: float = 0.3, scale: tuple[float, ...] | None = None) -> np.ndarray:
    """Membership in [0, 1] of an irregular lump: a sphere (``radius`` in the units of ``scale``, per voxel)
    whose surface is moved by smooth noise. Computed in the lump's bounding box only."""
    scale = scale or (1.0,) * len(shape)
    reach = [radius * (1.6 + irregularity) / s for s in scale]
    box = tuple(slice(max(int(c - r), 0), min(int(np.ceil(c + r)) + 1, n)) for c, r, n in zip(center, reach, shape))
    out = np.zeros(shape, np.float32)
    local = tuple(b.stop - b.start for b in box)
    if min(local) <= 0:
        return out
    grids = np.ogrid[tuple(slice(b.start, b.stop) for b in box)]
    distance = np.sqrt(sum(((g.astype(np.float32) - c) * s) ** 2 for g, c, s in zip(grids, center, scale))) / radius
    bumps = smooth_noise(local, rng, sigma=max(radius / 2.5 / min(scale), 1.0))
    edge = distance + irregularity * bumps * np.clip(distance, 0.3, 1.0)
    out[box] = np.clip((1.15 - edge) / 0.3, 0.0, 1.0)  # about 1 voxel of soft edge (partial volume)
    return out


def thick_slices(volume: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor`` 1 mm slices into one thick slice (what a 5 mm acquisition records)."""
    z = volume.shape[0] // factor * factor
    return volume[:z].reshape(z // factor, factor, *volume.shape[1:]).mean(axis=1)


# -- brain MRI --------------------------------------------------------------------------------------------


def brain_tumor_study(head: Head, rng: np.random.Generator, positive: bool = True) -> SyntheticStudy:
    """A head MRI from ``head`` with a new pose, shape, bias and noise, and (if ``positive``) a brain tumour."""
    image, brain = _vary_head(head, rng)
    labels: dict[str, np.ndarray] = {}
    if positive:
        image, brain, tumor = _add_brain_tumor(image, brain, rng)
        labels["Brain tumor"] = tumor
    image = _mr_acquisition(image, rng)
    factor = int(SLICE_MM / head.spacing_mm)
    zs = np.flatnonzero(brain.any(axis=(1, 2)))
    low, high = max(zs[0] - 5, 0), min(zs[-1] + 6, image.shape[0])  # the brain and a margin
    slab = slice(low, low + (high - low) // factor * factor)
    voxels = thick_slices(image[slab], factor)
    lesions = [(k, thick_slices(v[slab].astype(np.float32), factor) >= 0.5) for k, v in labels.items()]
    return SyntheticStudy("MR", "HEAD", voxels.astype(np.float32), head.spacing_mm, SLICE_MM, lesions,
                          f"T1 axial ({head.name} based)")


def _vary_head(head: Head, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A new subject: scaled (0.92-1.08 per axis), rotated in plane (up to 8 degrees), elastically warped."""
    shape = np.array(head.image.shape)
    center = (shape - 1) / 2
    angle = np.deg2rad(rng.uniform(-8, 8))
    rotation = np.array([[1, 0, 0], [0, np.cos(angle), -np.sin(angle)], [0, np.sin(angle), np.cos(angle)]])
    matrix = rotation @ np.diag(1 / rng.uniform(0.92, 1.08, 3))
    coarse = tuple(max(int(n // 24), 2) for n in shape)
    warp = [ndimage.zoom(rng.normal(0, 2.5, coarse), np.array(shape) / coarse, order=1)[:shape[0], :shape[1], :shape[2]]
            for _ in range(3)]
    grid = np.indices(shape, dtype=np.float32).reshape(3, -1)
    source = (matrix @ (grid - center[:, None]) + center[:, None]).reshape(3, *shape)
    source += np.stack([np.pad(w, [(0, s - w.shape[i]) for i, s in enumerate(shape)], mode="edge") for w in warp])
    image = ndimage.map_coordinates(head.image, source, order=1, mode="constant")
    brain = ndimage.map_coordinates(head.brain.astype(np.float32), source, order=1, mode="constant") > 0.5
    return image.astype(np.float32), brain


def _add_brain_tumor(image: np.ndarray, brain: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    radius = rng.uniform(7.0, 22.0)  # mm (1 mm voxels): 14 to 44 mm across
    inner = ndimage.distance_transform_edt(brain)
    candidates = np.argwhere(inner > min(radius * 0.8, inner.max() * 0.7))
    center = candidates[rng.integers(len(candidates))].astype(np.float32)
    box = [slice(max(int(c - 3 * radius), 0), min(int(c + 3 * radius) + 1, n)) for c, n in zip(center, image.shape)]
    local_center = center - np.array([b.start for b in box])
    shape = tuple(b.stop - b.start for b in box)
    # Mass effect: tissue near the tumour is pushed outward (sampled from closer to the centre).
    grid = np.indices(shape, dtype=np.float32)
    offset = grid - local_center[:, None, None, None]
    r = np.sqrt((offset ** 2).sum(0))
    pull = 1 - rng.uniform(0.25, 0.45) * np.exp(-(r / (1.6 * radius)) ** 2)
    source = local_center[:, None, None, None] + offset * pull
    region = image[tuple(box)]
    image, brain = image.copy(), brain.copy()
    image[tuple(box)] = ndimage.map_coordinates(region, source, order=1, mode="nearest")
    brain[tuple(box)] = ndimage.map_coordinates(brain[tuple(box)].astype(np.float32), source, order=1, mode="nearest") > 0.5
    membership = blob(shape, local_center, radius, rng, irregularity=rng.uniform(0.15, 0.45))
    membership *= brain[tuple(box)]
    tissue = float(np.median(image[brain]))
    contrast = rng.choice([rng.uniform(1.45, 1.9), rng.uniform(0.35, 0.6)])  # enhancing or necrotic / hypointense
    texture = 1 + 0.08 * smooth_noise(shape, rng, 1.5)
    lesion = tissue * contrast * texture
    if rng.random() < 0.3:  # ring: a bright rim round a dark core
        core = blob(shape, local_center, radius * 0.6, rng, 0.2)
        lesion = lesion * (1 - core) + tissue * 0.45 * core
    region = image[tuple(box)]
    image[tuple(box)] = region * (1 - membership) + lesion * membership
    tumor = np.zeros(image.shape, bool)
    tumor[tuple(box)] = membership >= 0.5
    return image, brain, tumor


def _mr_acquisition(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gain, gamma, a smooth bias field and Rician noise, scaled to a 12-bit range."""
    image = image / max(float(image.max()), 1e-6)
    image = image ** rng.uniform(0.85, 1.2)
    coarse = ndimage.zoom(rng.normal(0, 1, (3, 3, 3)), np.array(image.shape) / 3, order=1)[:image.shape[0], :image.shape[1], :image.shape[2]]
    coarse = np.pad(coarse, [(0, s - c) for s, c in zip(image.shape, coarse.shape)], mode="edge")
    image = image * (1 + rng.uniform(0.05, 0.15) * coarse / (np.abs(coarse).max() + 1e-6))
    sigma = rng.uniform(0.01, 0.035)
    noisy = np.sqrt((image + rng.normal(0, sigma, image.shape)) ** 2 + rng.normal(0, sigma, image.shape) ** 2)
    return (noisy * rng.uniform(1500, 3500)).astype(np.float32)


# -- CT phantoms ------------------------------------------------------------------------------------------

CT_SIZE, CT_PIXEL_MM, CT_SUBSLICES = 256, 1.5, 5  # 384 mm field of view, 5 mm slices from 1 mm


def ct_study(rng: np.random.Generator, region: str, lesions: int) -> SyntheticStudy:
    """An abdomen (liver and kidney tumours) or chest (lung nodules) CT in portal venous phase, in HU."""
    slices = int(rng.integers(20, 27))
    shape = (slices * CT_SUBSLICES, CT_SIZE, CT_SIZE)
    scale = (1.0, CT_PIXEL_MM, CT_PIXEL_MM)  # mm per voxel (z, y, x)
    hu = np.full(shape, -1000.0, np.float32)
    organs: dict[str, np.ndarray] = {}
    body = _body(shape, rng)
    hu[body > 0.5] = -100.0  # fat
    hu[_shrink(body, rng.uniform(8, 16) / CT_PIXEL_MM) > 0.5] = 45.0  # muscle wall and soft tissue
    if region == "abdomen":
        organs = _abdomen(hu, shape, scale, rng)
    else:
        organs = _chest(hu, shape, scale, rng)
    _spine(hu, shape, rng)
    kinds = {"abdomen": ["Liver tumor", "Kidney tumor"], "chest": ["Lung nodule"]}[region]
    placed: list[tuple[str, np.ndarray]] = []
    for _ in range(lesions):
        label = kinds[rng.integers(len(kinds))]
        lesion = _ct_lesion(hu, organs, label, shape, scale, rng)
        if lesion is not None:
            placed.append((label, lesion))
    hu = ndimage.gaussian_filter(hu, (0.5, 0.7, 0.7))  # the scanner's point spread
    hu += rng.uniform(6, 16) * smooth_noise(shape, rng, 0.6)  # correlated quantum noise
    voxels = thick_slices(hu, CT_SUBSLICES)
    return SyntheticStudy("CT", region.upper(), voxels, CT_PIXEL_MM, CT_SUBSLICES * 1.0, _thick_lesions(placed),
                          f"{region.capitalize()} CT portal venous")


def _thick_lesions(placed: list[tuple[str, np.ndarray]]) -> list[tuple[str, np.ndarray]]:
    """Each lesion's mask on the thick slices. A label's union is where its lesions together fill half the
    slab; each voxel of it goes to the lesion that fills most of it, so lesions that touch stay apart."""
    thick: list[tuple[str, np.ndarray]] = []
    for label in sorted({label for label, _ in placed}):
        fractions = np.stack([thick_slices(m.astype(np.float32), CT_SUBSLICES) for l, m in placed if l == label])
        union = thick_slices(np.any([m for l, m in placed if l == label], axis=0).astype(np.float32), CT_SUBSLICES) >= 0.5
        owner = fractions.argmax(axis=0)
        thick += [(label, union & (owner == i)) for i in range(len(fractions)) if (union & (owner == i)).any()]
    return thick


def _grid(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[:shape[1], :shape[2]].astype(np.float32)
    return yy, xx


def _body(shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    yy, xx = _grid(shape)
    a, b = rng.uniform(150, 180) / CT_PIXEL_MM, rng.uniform(100, 125) / CT_PIXEL_MM  # half width, half depth
    ellipse = ((xx - 128) / a) ** 2 + ((yy - 128) / b) ** 2
    return np.broadcast_to(np.clip((1.02 - ellipse) / 0.04, 0, 1), shape)


def _shrink(body: np.ndarray, pixels: float) -> np.ndarray:
    inner = ndimage.distance_transform_edt(body[0] > 0.5) > pixels
    return np.broadcast_to(inner, body.shape).astype(np.float32)


def _ellipsoid(shape, scale, center_mm, radii_mm, rng, irregularity=0.15) -> np.ndarray:
    center = np.array(center_mm) / np.array(scale)
    radius = radii_mm[0]
    stretch = tuple(s * radius / r for s, r in zip(scale, radii_mm))
    return blob(shape, center, radius, rng, irregularity, stretch) > 0.5


def _abdomen(hu: np.ndarray, shape, scale, rng) -> dict[str, np.ndarray]:
    z_mm, w = shape[0], shape[1] * CT_PIXEL_MM
    liver = _ellipsoid(shape, scale, (z_mm * rng.uniform(0.6, 0.75), w * 0.45, w * 0.36), (z_mm * 0.45, 75, 80), rng, 0.2)
    spleen = _ellipsoid(shape, scale, (z_mm * 0.7, w * 0.55, w * 0.7), (z_mm * 0.25, 40, 30), rng)
    kidneys = (_ellipsoid(shape, scale, (z_mm * rng.uniform(0.3, 0.45), w * 0.6, w * 0.37), (45, 28, 25), rng)
               | _ellipsoid(shape, scale, (z_mm * rng.uniform(0.3, 0.45), w * 0.6, w * 0.63), (45, 28, 25), rng))
    bowel = _ellipsoid(shape, scale, (z_mm * 0.35, w * 0.4, w * 0.52), (z_mm * 0.35, 45, 60), rng, 0.35)
    hu[bowel] = 25.0
    gas = bowel & (smooth_noise(shape, rng, 3.0) > 1.4)
    hu[gas] = -900.0
    hu[liver], hu[spleen], hu[kidneys] = 110.0, 120.0, 165.0
    aorta = _ellipsoid(shape, scale, (z_mm / 2, w * 0.58, w * 0.5), (z_mm, 11, 11), rng, 0.02)
    hu[aorta] = 180.0
    return {"Liver tumor": liver & ~aorta, "Kidney tumor": kidneys}


def _chest(hu: np.ndarray, shape, scale, rng) -> dict[str, np.ndarray]:
    z_mm, w = shape[0], shape[1] * CT_PIXEL_MM
    lungs = (_ellipsoid(shape, scale, (z_mm / 2, w * 0.5, w * 0.33), (z_mm * 0.8, 70, 55), rng, 0.1)
             | _ellipsoid(shape, scale, (z_mm / 2, w * 0.5, w * 0.67), (z_mm * 0.8, 70, 55), rng, 0.1))
    hu[lungs] = -860.0
    vessels = lungs & (np.abs(smooth_noise(shape, rng, 2.0)) < 0.06)
    hu[vessels] = 30.0
    heart = _ellipsoid(shape, scale, (z_mm * 0.35, w * 0.45, w * 0.55), (z_mm * 0.5, 55, 60), rng)
    hu[heart] = 45.0
    return {"Lung nodule": lungs & ~heart}


def _spine(hu: np.ndarray, shape, rng) -> None:
    yy, xx = _grid(shape)
    cy, cx = 128 + rng.uniform(50, 60) / CT_PIXEL_MM, 128 + rng.normal(0, 2)
    r = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) * CT_PIXEL_MM
    hu[:, r < 16] = 250.0  # cancellous
    hu[:, (r >= 16) & (r < 19)] = 700.0  # cortex


def _ct_lesion(hu, organs, label, shape, scale, rng) -> np.ndarray | None:
    organ = organs[label]
    radius = {"Liver tumor": rng.uniform(6, 20), "Kidney tumor": rng.uniform(6, 17), "Lung nodule": rng.uniform(3.5, 12)}[label]
    depth = ndimage.distance_transform_edt(organ, sampling=scale)
    inside = np.argwhere(depth > (radius * 0.5 if label == "Kidney tumor" else radius + 2))
    if not len(inside):
        return None
    center = inside[rng.integers(len(inside))] * np.array(scale)
    stretch = tuple(s for s in scale)
    membership = blob(shape, center / np.array(scale), radius, rng, rng.uniform(0.1, 0.35), stretch)
    if label == "Lung nodule":
        value = rng.uniform(15, 60)
    elif label == "Liver tumor":
        value = rng.choice([rng.uniform(30, 75), rng.uniform(150, 180)])  # hypo- or hyper-enhancing
    else:
        value = rng.uniform(55, 105)
    texture = value + 8 * smooth_noise(shape, rng, 1.0)
    hu[:] = hu * (1 - membership) + texture * membership
    return membership >= 0.5
