"""Resampling by world coordinates with SimpleITK.

Every function keeps the physical space: a voxel centre maps to the same world point (LPS, mm) before and after.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import SimpleITK as sitk

from .gate import DEFAULT_MAX_VOXELS, ImageError
from .io import Geometry

_INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline}


def resample_to_grid(image: sitk.Image, grid: sitk.Image | Geometry, interpolator: str = "linear",
                     default: float = 0.0) -> sitk.Image:
    """`image` sampled on the voxel grid of `grid` (world coordinates; voxels outside `image` get `default`)."""
    geometry = grid if isinstance(grid, Geometry) else Geometry.of(grid)
    if Geometry.of(image).matches(geometry, tolerance=1e-6):
        return image
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(s) for s in geometry.size])
    resampler.SetOutputSpacing(geometry.spacing)
    resampler.SetOutputOrigin(geometry.origin)
    resampler.SetOutputDirection(geometry.direction)
    resampler.SetInterpolator(_INTERPOLATORS[interpolator])
    resampler.SetDefaultPixelValue(default)
    resampler.SetOutputPixelType(image.GetPixelID())
    return resampler.Execute(image)


MAX_UPSAMPLING = 64  # a 6 mm-slice MR brought to a 1 mm plan is 6x; a 2 mm CT to a 0.5 mm plan, 64x
SMALL_GRID_VOXELS = 1 << 24  # below this (256^3), any upsampling: no more work than an honest small upload


def grid_with_spacing(geometry: Geometry, spacing: Sequence[float]) -> Geometry:
    """The grid that covers the same physical box as `geometry` at `spacing` (x, y, z), same origin/direction.

    The first voxel centre stays at the origin, and the extent (size * spacing) is kept to within one new voxel.
    """
    spacing = tuple(float(s) for s in spacing)
    exact = [n * s / t for n, s, t in zip(geometry.size, geometry.spacing, spacing)]
    # The guard every resampling passes: an image read through the gate cannot ask for more voxels than the gate
    # allows, whatever spacing it is brought to (a coarse image at a much finer plan spacing would), nor for more
    # than MAX_UPSAMPLING times its own above SMALL_GRID_VOXELS (a 4x4x4 upload at 250 mm spacing asked a predictor
    # for minutes of work and GBs of memory: an amplification no honest image needs).
    voxels = float(np.prod(np.maximum(exact, 1.0))) if all(np.isfinite(exact)) else float("inf")
    allowed = min(DEFAULT_MAX_VOXELS, max(SMALL_GRID_VOXELS, MAX_UPSAMPLING * float(np.prod(geometry.size))))
    if voxels > allowed:
        bound = (f"more than {DEFAULT_MAX_VOXELS:,} voxels" if voxels > DEFAULT_MAX_VOXELS else
                 f"{voxels:,.0f} voxels, more than {MAX_UPSAMPLING} times its own")
        raise ImageError(f"bringing a {'x'.join(map(str, geometry.size))} image at "
                         f"{'x'.join(f'{s:g}' for s in geometry.spacing)} mm to {'x'.join(f'{s:g}' for s in spacing)} mm "
                         f"would make {bound}; check the image's spacing, or use a model planned for images like it")
    size = tuple(max(1, int(round(e))) for e in exact)
    return Geometry(size=size, spacing=spacing, origin=geometry.origin, direction=geometry.direction)


def resample_to_spacing(image: sitk.Image, spacing: Sequence[float], interpolator: str = "linear",
                        default: float = 0.0) -> sitk.Image:
    return resample_to_grid(image, grid_with_spacing(Geometry.of(image), spacing), interpolator, default)


def world_to_index(geometry: Geometry, points: np.ndarray) -> np.ndarray:
    """Continuous (x, y, z) voxel indices of LPS world points (N, 3)."""
    direction = np.asarray(geometry.direction).reshape(3, 3)
    rel = np.asarray(points, dtype=float) - np.asarray(geometry.origin)
    return (np.linalg.inv(direction) @ rel.T).T / np.asarray(geometry.spacing)


def index_to_world(geometry: Geometry, indices: np.ndarray) -> np.ndarray:
    """LPS world points of (x, y, z) voxel indices (N, 3)."""
    direction = np.asarray(geometry.direction).reshape(3, 3)
    scaled = np.asarray(indices, dtype=float) * np.asarray(geometry.spacing)
    return (direction @ scaled.T).T + np.asarray(geometry.origin)
