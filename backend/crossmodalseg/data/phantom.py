"""A synthetic CT + MR "abdomen" phantom: CrossModalSeg's offline sample dataset.

The demo and the test suite train on it, so it is built to be learnt in minutes by a small 3D U-Net on CPU while
still needing more than a threshold: structures are told apart by position, shape and texture as well as intensity,
and the images carry noise, blur, an MR bias field and unlabelled distractors.

Anatomy (one random patient per case; `numpy.random.Generator` seeded by `(seed, case index)`)
    - body: an elliptic cross-section (slowly varying along z) in air, a subcutaneous fat ring around soft tissue,
      and blobs of visceral fat in the abdominal cavity;
    - liver (label 1): a large ellipsoid on the patient's right, thicker laterally, deformed by a smooth random
      displacement field;
    - kidneys (label 2, both): small oblique ellipsoids either side of the spine, each in a fat capsule and with a
      renal pelvis at its hilum (still labelled kidney);
    - spleen (label 3): an oblique ellipsoid on the patient's left, posterior and superior, in a thin fat rim;
    - unlabelled: a spine-like cylinder (cortical shell, cancellous core) and an aorta in front of it.
    Every case jitters positions (a few mm), sizes (about +-15 %) and orientations (a few degrees). Structures are
    drawn in order into one tissue map, so labels never overlap; all organs are clipped to the abdominal cavity.

    The layout is defined for a 192 x 192 x 160 mm field of view (the defaults: 64 x 64 x 40 voxels of
    3 x 3 x 4 mm) and scales with the field of view given. It lives in voxel-index space: with the identity
    direction +x is the patient's left, +y posterior and +z superior (LPS); another `direction` turns the whole
    patient in world space along with the grid. The volume's centre is at world (0, 0, 0).

Intensities (before blur and noise)
    tissue           CT (HU, int16)      MR (T2-like, a.u., int16)
    air              -1000               0
    fat              -100                750
    soft tissue      40                  140
    liver            60 (+-5 / case)     200      dark
    spleen           45 (+-3 / case)     420      bright, homogeneous
    kidney           150 (+-20 / case)   650      brighter, with a fluid-bright pelvis ...
    renal pelvis     20                  950      ... so kidney and spleen differ by texture and intensity
    bone shell/core  700 / 300           30 / 350 dark cortex
    aorta            180 (+-30 / case)   40       contrast-enhanced in CT, flow void in MR
    CT: Gaussian blur (sigma 0.6 voxel), Gaussian noise (sigma 15 HU), clipped to [-1024, 3071].
    MR: a per-case gain (0.85..1.15), Gaussian blur (sigma 0.7 voxel), a smooth multiplicative bias field
    (about 0.7..1.4) and Rician noise (sigma 20).

In paired mode every modality of a case is drawn from the same anatomy on the same grid (co-registered), and each
modality gets its own, identical, label file. Same arguments give identical arrays; case i does not depend on
`n_cases`, and adding or removing a modality does not change the other modality's image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from ..errors import UserError
from .io import Geometry, from_array, write_image
from .spec import Case, DatasetSpec

LABELS = {"background": 0, "liver": 1, "kidney": 2, "spleen": 3}
MODALITIES = {"ct": "CT", "mr": "MR"}
DATASET_NAME = "phantom"

_REFERENCE_EXTENT = (192.0, 192.0, 160.0)  # mm (x, y, z) that the layout below is drawn for
_STREAM = {"anatomy": 0, "ct": 1, "mr": 2}  # independent random streams per case

# Tissue codes of the intermediate tissue map.
AIR, FAT, SOFT, LIVER, SPLEEN, KIDNEY, PELVIS, BONE, MARROW, AORTA = range(10)
_TISSUE_LABEL = np.zeros(10, np.uint8)
_TISSUE_LABEL[[LIVER, KIDNEY, PELVIS, SPLEEN]] = [1, 2, 2, 3]

_CT_HU = np.array([-1000, -100, 40, 60, 45, 150, 20, 700, 300, 180], np.float32)
_MR_AU = np.array([0, 750, 140, 200, 420, 650, 950, 30, 350, 40], np.float32)

Coords = tuple[np.ndarray, np.ndarray, np.ndarray]  # (x, y, z) in reference mm, each broadcastable to (z, y, x)


def make_phantom_dataset(out_dir: str | Path, n_cases: int = 8, seed: int = 0,
                         size: tuple[int, int, int] = (64, 64, 40),
                         spacing: tuple[float, float, float] = (3.0, 3.0, 4.0),
                         modalities: tuple[str, ...] = ("ct", "mr"), paired: bool = True,
                         direction: tuple[float, ...] | None = None) -> DatasetSpec:
    """Writes the phantom dataset under `out_dir` and returns its spec (absolute paths, as `load_spec` gives).

    Layout: `out_dir/<case_id>/<modality>.nii.gz` (image), `out_dir/<case_id>/<modality>_label.nii.gz` (uint8
    label) and `out_dir/dataset.json`; case ids are `case000`, `case001`, ...

    `size` and `spacing` are in ITK (x, y, z) order; `direction` is a row-major orthonormal 3x3 (default identity).
    `paired=True`: every case has every modality of `modalities`, co-registered. `paired=False`: case i has only
    `modalities[i % len(modalities)]` (unpaired data: each case is a different patient anyway).
    """
    modalities = tuple(modalities)
    unknown = [m for m in modalities if m not in MODALITIES]
    if not modalities or unknown or len(set(modalities)) != len(modalities):
        raise UserError(f"modalities must be distinct names out of {sorted(MODALITIES)}, got {modalities!r}")
    if n_cases < 1:
        raise UserError(f"n_cases must be at least 1, got {n_cases}")
    if int(seed) < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed}")
    geometry = _geometry(size, spacing, direction)

    root = Path(out_dir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []
    for index in range(n_cases):
        case_id = f"case{index:03d}"
        wanted = modalities if paired else (modalities[index % len(modalities)],)
        tissue = _anatomy(_rng(seed, index, "anatomy"), geometry)
        label = _TISSUE_LABEL[tissue]
        images: dict[str, Path] = {}
        labels: dict[str, Path] = {}
        for modality in wanted:
            render = _render_ct if modality == "ct" else _render_mr
            volume = render(tissue, _rng(seed, index, modality))
            images[modality] = write_image(from_array(volume, geometry), root / case_id / f"{modality}.nii.gz")
            labels[modality] = write_image(from_array(label, geometry), root / case_id / f"{modality}_label.nii.gz")
        cases.append(Case(id=case_id, images=images, labels=labels, co_registered=paired and len(images) > 1))

    spec = DatasetSpec(name=DATASET_NAME, labels=dict(LABELS),
                       modalities={m: MODALITIES[m] for m in modalities}, cases=cases, root=root)
    spec.save(root)
    return spec


# ---- grid and randomness -------------------------------------------------------------------------------------
def _geometry(size, spacing, direction) -> Geometry:
    size = tuple(int(s) for s in size)
    spacing = tuple(float(s) for s in spacing)
    if len(size) != 3 or min(size) < 4:
        raise UserError(f"size must be 3 numbers (x, y, z), each at least 4, got {size}")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise UserError(f"spacing must be 3 positive numbers (x, y, z), got {spacing}")
    matrix = np.eye(3) if direction is None else np.asarray(direction, float)
    if matrix.size != 9 or not np.allclose(matrix.reshape(3, 3) @ matrix.reshape(3, 3).T, np.eye(3), atol=1e-6):
        raise UserError(f"direction must be a row-major orthonormal 3x3 matrix (9 numbers), got {direction!r}")
    matrix = matrix.reshape(3, 3)
    # Origin such that the volume's centre lies at world (0, 0, 0), as scanners roughly do.
    half = (np.array(size) - 1) * np.array(spacing) / 2.0
    origin = -(matrix @ half)
    return Geometry(size, spacing, tuple(float(v) + 0.0 for v in origin), tuple(float(v) for v in matrix.ravel()))


def _rng(seed: int, index: int, stream: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), index, _STREAM[stream]])


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], knots: tuple[int, ...]) -> np.ndarray:
    """A low-frequency random field of unit standard deviation: white noise on a coarse grid of `knots` per axis
    (spanning a little beyond the volume), interpolated with separable cubic B-splines."""
    field = rng.standard_normal(knots)
    for axis, (n, k) in enumerate(zip(shape, knots)):
        step = (n - 1) / max(k - 3, 1)  # one knot beyond each end
        centres = (np.arange(k) - 1) * step
        t = np.abs(np.arange(n)[:, None] - centres[None, :]) / step
        basis = np.where(t < 1, 2 / 3 - t**2 + t**3 / 2, np.where(t < 2, (2 - t) ** 3 / 6, 0.0))
        field = np.moveaxis(np.tensordot(basis, field, axes=([1], [axis])), 0, axis)
    return ((field - field.mean()) / (field.std() + 1e-6)).astype(np.float32)


def _coordinates(geometry: Geometry) -> Coords:
    """Voxel centres in reference mm about the volume centre (the layout's frame), as open (z, y, x) grids."""
    size, spacing = np.array(geometry.size), np.array(geometry.spacing)
    extent = size * spacing
    scale = np.array([min(extent[0], extent[1]) / _REFERENCE_EXTENT[0]] * 2 + [extent[2] / _REFERENCE_EXTENT[2]])
    axes = [(np.arange(n) - (n - 1) / 2.0) * s / k for n, s, k in zip(size, spacing, scale)]
    z, y, x = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij", sparse=True)
    return x.astype(np.float32), y.astype(np.float32), z.astype(np.float32)


def _rotation(rng: np.random.Generator, base_z_deg: float = 0.0, jitter_z: float = 10.0,
              jitter_xy: float = 5.0) -> np.ndarray:
    """A small random rotation: about x and y by up to `jitter_xy` degrees, about z by `base_z_deg` +- `jitter_z`."""
    ax, ay = np.deg2rad(rng.uniform(-jitter_xy, jitter_xy, 2))
    az = np.deg2rad(base_z_deg + rng.uniform(-jitter_z, jitter_z))
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _local(p: Coords, centre, rotation: np.ndarray) -> Coords:
    """Coordinates in an object's frame: R^T (p - centre)."""
    d = [p[k] - np.float32(centre[k]) for k in range(3)]
    return tuple(sum(np.float32(rotation[j, k]) * d[j] for j in range(3)) for k in range(3))  # type: ignore[return-value]


def _ellipsoid(q: Coords, semi_axes) -> np.ndarray:
    """Squared normalised radius: < 1 inside the ellipsoid with `semi_axes` in the local frame `q`."""
    return sum((q[k] / np.float32(semi_axes[k])) ** 2 for k in range(3))


# ---- anatomy -------------------------------------------------------------------------------------------------
def _anatomy(rng: np.random.Generator, geometry: Geometry) -> np.ndarray:
    """The tissue map (z, y, x) of one random patient. Draws from `rng` in a fixed order (determinism)."""
    shape = tuple(reversed(geometry.size))
    x, y, z = _coordinates(geometry)
    zn = z / np.float32(_REFERENCE_EXTENT[2] / 2)  # -1 (inferior) .. 1 (superior)
    jitter = lambda mm: rng.uniform(-1.0, 1.0, 3) * np.asarray(mm)  # noqa: E731
    scale = lambda: rng.uniform(0.85, 1.15, 3)  # noqa: E731
    tissue = np.full(shape, AIR, np.uint8)

    # Body: elliptic section, a bit wider inferiorly, subcutaneous fat ring around soft tissue.
    a, b = 82.0 * rng.uniform(0.9, 1.1), 62.0 * rng.uniform(0.9, 1.1)
    cx, cy = rng.uniform(-4, 4, 2)
    taper = np.float32(1.0) - np.float32(rng.uniform(0.02, 0.06)) * zn
    body = ((x - cx) / (a * taper)) ** 2 + ((y - cy) / (b * taper)) ** 2
    fat_mm = rng.uniform(6.0, 12.0)
    cavity = ((x - cx) / (a * taper - fat_mm)) ** 2 + ((y - cy) / (b * taper - fat_mm)) ** 2 < 1
    tissue[np.broadcast_to(body < 1, shape)] = FAT
    tissue[np.broadcast_to(cavity, shape)] = SOFT
    cavity = np.broadcast_to(cavity, shape)

    # Visceral fat: blobs where a smooth random field is high.
    visceral = _smooth_noise(rng, shape, (6, 8, 8)) > rng.uniform(0.8, 1.1)
    tissue[cavity & visceral] = FAT

    # A smooth deformation for all organs, and a stronger one for the liver.
    warp = [3.0 * _smooth_noise(rng, shape, (5, 6, 6)) for _ in range(3)]
    p: Coords = (x + warp[0], y + warp[1], z + warp[2])
    liver_warp = [7.0 * _smooth_noise(rng, shape, (5, 6, 6)) for _ in range(3)]
    pl: Coords = (p[0] + liver_warp[0], p[1] + liver_warp[1], p[2] + liver_warp[2])

    # Liver: patient's right (-x), anterior, superior; thicker laterally than medially.
    q = _local(pl, np.array([-30.0, -6.0, 18.0]) + jitter([5, 5, 8]), _rotation(rng))
    semi = np.array([40.0, 36.0, 55.0]) * scale()
    thickness = np.clip(1.0 - 0.3 * q[0] / np.float32(semi[0]), 0.5, 1.5)
    liver = (q[0] / semi[0]) ** 2 + (q[1] / (semi[1] * thickness)) ** 2 + (q[2] / semi[2]) ** 2 < 1
    tissue[cavity & liver] = LIVER

    # Spleen: patient's left (+x), posterior, superior, long axis along the posterolateral wall; thin fat rim.
    q = _local(p, np.array([48.0, 6.0, 28.0]) + jitter([4, 4, 6]), _rotation(rng, base_z_deg=-30.0))
    r = _ellipsoid(q, np.array([15.0, 28.0, 32.0]) * scale())
    tissue[cavity & (r < 1.25) & (tissue != LIVER)] = FAT
    tissue[cavity & (r < 1)] = SPLEEN

    # Kidneys: either side of the spine, the left one higher; fat capsule, pelvis at the medial (hilum) side.
    for side, centre, tilt in ((-1, [-42.0, 24.0, -26.0], 25.0), (1, [42.0, 24.0, -18.0], -25.0)):
        rotation = _rotation(rng, base_z_deg=tilt)
        centre = np.array(centre) + jitter([4, 4, 8])
        semi = np.array([14.0, 11.0, 25.0]) * scale()
        r = _ellipsoid(_local(p, centre, rotation), semi)
        tissue[cavity & (r < 1.35)] = FAT
        tissue[cavity & (r < 1)] = KIDNEY
        hilum = centre + rotation @ np.array([-side * 0.45 * semi[0], 0.0, 0.0])
        pelvis = _ellipsoid(_local(p, hilum, rotation), semi * np.array([0.35, 0.45, 0.35]))
        tissue[cavity & (r < 1) & (pelvis < 1)] = PELVIS

    # Aorta (in front of the spine, slightly left) and spine (cortical shell, cancellous core): unlabelled.
    ax, ay = np.array([8.0, 14.0]) + rng.uniform(-3, 3, 2)
    aorta = (x - ax) ** 2 + (y - ay) ** 2 < rng.uniform(6.0, 8.0) ** 2
    tissue[cavity & np.broadcast_to(aorta, shape)] = AORTA
    sx, sy, radius = rng.uniform(-3, 3), 34.0 + rng.uniform(-3, 3), 11.0 * rng.uniform(0.9, 1.1)
    spine = (x - sx) ** 2 + (y - sy) ** 2
    tissue[np.broadcast_to(spine < radius ** 2, shape)] = BONE
    tissue[np.broadcast_to(spine < (radius - 3.0) ** 2, shape)] = MARROW
    return tissue


# ---- rendering -----------------------------------------------------------------------------------------------
def _render_ct(tissue: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """CT-like image in Hounsfield units (int16)."""
    table = _CT_HU.copy()
    table[LIVER] += rng.uniform(-5, 5)
    table[SPLEEN] += rng.uniform(-3, 3)
    table[KIDNEY] += rng.uniform(-20, 20)
    table[AORTA] += rng.uniform(-30, 30)
    hu = ndimage.gaussian_filter(table[tissue], 0.6)
    hu += rng.normal(0.0, 15.0, hu.shape).astype(np.float32)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def _render_mr(tissue: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """T2-like MR image in arbitrary units (int16): gain, blur, smooth bias field, Rician noise."""
    signal = ndimage.gaussian_filter(_MR_AU[tissue] * np.float32(rng.uniform(0.85, 1.15)), 0.7)
    signal *= np.exp(0.15 * _smooth_noise(rng, tissue.shape, (4, 4, 4)))
    sigma = np.float32(20.0)
    real = signal + sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    imag = sigma * rng.standard_normal(signal.shape, dtype=np.float32)
    return np.clip(np.rint(np.hypot(real, imag)), 0, 32767).astype(np.int16)
