"""Image IO with SimpleITK: geometry (spacing, origin, direction) is kept exactly; writes are atomic.

Arrays are in SimpleITK's array order (z, y, x); spacing, origin and direction are in ITK's physical (LPS) order.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from ..files import write_atomic
from .gate import ImageError, Limits, gated

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


@dataclass(frozen=True)
class Geometry:
    """The voxel grid of an image: size (x, y, z), spacing, origin and direction (row-major 3x3) in LPS."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> "Geometry":
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   tuple(image.GetDirection()))

    def matches(self, other: "Geometry", tolerance: float = 1e-4) -> bool:
        """Same grid: equal size, and spacing/origin/direction equal within `tolerance` (relative to spacing)."""
        if self.size != other.size:
            return False
        scale = max(max(self.spacing), 1e-6)
        return (np.allclose(self.spacing, other.spacing, atol=tolerance * scale)
                and np.allclose(self.origin, other.origin, atol=tolerance * scale)
                and np.allclose(self.direction, other.direction, atol=tolerance))

    def describe(self) -> str:
        fmt = lambda v: "(" + ", ".join(f"{x:.4g}" for x in v) + ")"  # noqa: E731
        return f"size {self.size}, spacing {fmt(self.spacing)}, origin {fmt(self.origin)}"

    def to_json(self) -> dict:
        return {"size": list(self.size), "spacing": list(self.spacing), "origin": list(self.origin),
                "direction": list(self.direction)}

    @classmethod
    def from_json(cls, data: dict) -> "Geometry":
        return cls(**{k: tuple(v) for k, v in data.items()})

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


@contextmanager
def gated_reader(path: str | Path, limits: Limits = Limits(), name: str | None = None
                 ) -> Iterator[sitk.ImageFileReader]:
    """An ITK reader of `path` once the gate has passed it, set to the reader whose header the gate checked
    (whatever the file's name); valid inside the `with` block."""
    with gated(path, limits, name) as (readable, image_io):
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(readable))
        reader.SetImageIO(image_io)
        yield reader


def read_image(path: str | Path, require_3d: bool = True, limits: Limits = Limits(), name: str | None = None
               ) -> sitk.Image:
    """Reads a 3D image through the gate (data.gate: no detached headers, no size bombs, no truncated data);
    raises ImageError for missing, refused, unreadable, non-3D or multi-component files. `name` is how messages
    call the file (default: its path)."""
    name = name or str(path)
    with gated_reader(path, limits, name) as reader:
        try:
            image = reader.Execute()
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            reason = next((line for line in first if "ERROR" in line or "Exception" in line), first[0] if first else "")
            reason = reason.replace(reader.GetFileName(), name)
            raise ImageError(f"{name}: not a readable image (corrupt or unsupported format): {reason.strip()[:200]}"
                             ) from None
    if require_3d:
        check_3d(image, name)
    if image.GetPixelID() in COMPLEX_PIXELS:  # reading it as float would drop the imaginary part without a word
        raise ImageError(f"{name}: complex-valued voxels (raw or phase MR data); give a real-valued image, e.g. "
                         f"the magnitude")
    check_geometry(image, name)
    return image


# Voxel spacing a medical image can have, in mm: a 0.1 um micro-CT voxel to a 1 m one. Outside it a header is broken
# (NaN, 0 or 1e30 pixdim), and resampling such an image to a plan's spacing would ask for astronomically many voxels.
SPACING_RANGE_MM = (1e-4, 1e3)
MAX_COORDINATE_MM = 1e7  # 10 km: any origin beyond is a broken header
ORTHONORMAL_TOLERANCE = 1e-3  # |DᵀD - I|: the shared images are within 1e-7 (float32 quaternions)
COMPLEX_PIXELS = (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64)  # read as float, imaginary parts vanish


def check_geometry(image: sitk.Image, name: str | Path = "image") -> None:
    """Refuses spacing, origin or direction that no scanner writes (the header is broken)."""
    spacing, origin = np.asarray(image.GetSpacing()), np.asarray(image.GetOrigin())
    lo, hi = SPACING_RANGE_MM
    if not (np.all(np.isfinite(spacing)) and np.all(spacing >= lo) and np.all(spacing <= hi)):
        raise ImageError(f"{name}: voxel spacing {tuple(float(v) for v in spacing)} mm is outside {lo:g}-{hi:g} mm; "
                         f"the header is broken: fix the spacing (pixdim) and save the image again")
    if not (np.all(np.isfinite(origin)) and np.all(np.abs(origin) <= MAX_COORDINATE_MM)):
        raise ImageError(f"{name}: origin {tuple(float(v) for v in origin)} is not a position in mm; the header is "
                         f"broken: fix the origin and save the image again")
    direction = np.asarray(image.GetDirection()).reshape(image.GetDimension(), image.GetDimension())
    if not (np.all(np.isfinite(direction)) and abs(np.linalg.det(direction)) > 1e-6):
        raise ImageError(f"{name}: its direction matrix is degenerate; the header is broken")
    # A sheared grid (e.g. CT with gantry tilt) cannot be kept: NIfTI writers turn its directions into a rotation
    # without a word, so a segmentation written for it would not lie on the image.
    if np.abs(direction.T @ direction - np.eye(len(direction))).max() > ORTHONORMAL_TOLERANCE:
        raise ImageError(f"{name}: its direction matrix is not orthonormal (a sheared grid, e.g. CT with gantry "
                         f"tilt); resample it to an orthogonal grid (in Slicer: DICOM acquisition geometry "
                         f"regularization, or Resample Scalar Volume) and save it again")


def check_3d(image: sitk.Image, name: str | Path = "image") -> None:
    dim = image.GetDimension()
    if dim == 2:
        raise ImageError(f"{name}: a 2D image ({image.GetSize()}); CrossModalSeg needs 3D volumes (stack the slices "
                         f"into one volume first)")
    if dim == 4 or (dim == 3 and image.GetNumberOfComponentsPerPixel() > 1):
        raise ImageError(f"{name}: a 4D or multi-component image; give one 3D volume per modality")
    if dim != 3:
        raise ImageError(f"{name}: a {dim}D image; CrossModalSeg needs 3D volumes")


def write_image(image: sitk.Image, path: str | Path, compress: bool = True) -> Path:
    """Writes atomically: a temporary file in the same folder, then a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = next((s for s in IMAGE_SUFFIXES if path.name.lower().endswith(s)), None)
    if suffix is None:
        raise ImageError(f"{path}: unknown image extension; use one of {', '.join(IMAGE_SUFFIXES)}")
    # The temporary name keeps the extension: ITK picks its writer by it.
    return write_atomic(path, lambda tmp: sitk.WriteImage(image, tmp, compress), suffix=".tmp" + suffix)


SLAB_VOXELS = 1 << 22  # voxels per slab: bounds the temporaries of a whole-image check (~32 MB at int64)


def slabs(image: sitk.Image) -> Iterator[np.ndarray]:
    """The image's voxels as (z, y, x) views of its buffer, a few slices at a time (no copy)."""
    array = sitk.GetArrayViewFromImage(image)
    step = max(1, SLAB_VOXELS // max(1, array[0].size))
    for z in range(0, array.shape[0], step):
        yield array[z:z + step]


def beyond_float32(array: np.ndarray) -> int:
    """How many finite values of `array` lie beyond float32's range: they become infinite in float32, in which the
    networks compute (none unless the array is float64)."""
    if array.dtype != np.float64:
        return 0
    return int(np.count_nonzero(np.isfinite(array) & (np.abs(array) > np.finfo(np.float32).max)))


def to_array(image: sitk.Image, dtype: npt.DTypeLike = np.float32) -> np.ndarray:
    """Voxel array in (z, y, x) order."""
    return sitk.GetArrayFromImage(image).astype(dtype, copy=False)


def from_array(array: np.ndarray, like: sitk.Image | Geometry) -> sitk.Image:
    """An image with `array` (z, y, x) as voxels and the geometry of `like`."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    geometry = like if isinstance(like, Geometry) else Geometry.of(like)
    if tuple(image.GetSize()) != geometry.size:
        raise ValueError(f"array of shape {array.shape} does not fit a grid of size {geometry.size} (x, y, z)")
    return geometry.apply_to(image)
