"""Image IO with SimpleITK: geometry (spacing, origin, direction) is kept exactly; writes are atomic.

Arrays are in SimpleITK's array order (z, y, x); spacing, origin and direction are in ITK's physical (LPS) order.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


class ImageError(ValueError):
    """An image file that cannot be used; the message names the file and the problem."""


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


def read_image(path: str | Path, require_3d: bool = True) -> sitk.Image:
    """Reads a 3D image; raises ImageError for missing, unreadable, non-3D or multi-component files."""
    path = Path(path)
    if not path.exists():
        raise ImageError(f"{path}: file not found")
    if path.name.lower().endswith(".gz"):
        check_gzip_complete(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        reason = next((line for line in first if "ERROR" in line or "Exception" in line), first[0] if first else "")
        raise ImageError(f"{path}: not a readable image (corrupt or unsupported format): {reason.strip()[:200]}") from None
    if require_3d:
        check_3d(image, path)
    return image


def check_gzip_complete(path: Path) -> None:
    """ITK reads a truncated .nii.gz without complaint (the missing voxels come back as zeros): decompress the whole
    stream once so that a cut-off download or copy is refused."""
    import gzip
    import zlib

    try:
        with gzip.open(path, "rb") as f:
            while f.read(1 << 22):
                pass
    except (EOFError, OSError, zlib.error) as e:
        raise ImageError(f"{path}: not a readable image: corrupt or truncated gzip file ({e}); copy or "
                         f"download it again") from None


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
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[: -len(suffix)]}.", suffix=".tmp" + suffix)
    os.close(fd)
    try:
        sitk.WriteImage(image, tmp, compress)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def to_array(image: sitk.Image, dtype=np.float32) -> np.ndarray:
    """Voxel array in (z, y, x) order."""
    return sitk.GetArrayFromImage(image).astype(dtype, copy=False)


def from_array(array: np.ndarray, like: sitk.Image | Geometry) -> sitk.Image:
    """An image with `array` (z, y, x) as voxels and the geometry of `like`."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    geometry = like if isinstance(like, Geometry) else Geometry.of(like)
    if tuple(image.GetSize()) != geometry.size:
        raise ValueError(f"array of shape {array.shape} does not fit a grid of size {geometry.size} (x, y, z)")
    return geometry.apply_to(image)
