"""PNG overlays for people: image, reference label, prediction (and member disagreement) on one axial slice."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402
import SimpleITK as sitk  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

from .data.io import to_array  # noqa: E402

PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]


def radiological(image: sitk.Image, dtype: npt.DTypeLike = np.float32) -> np.ndarray:
    """The (z, y, x) array of an image reoriented so that axial slices show as radiologists read them: anterior up,
    the patient's right on the viewer's left (whatever the file's direction matrix)."""
    return to_array(sitk.DICOMOrient(image, "LPS"), dtype)


def busiest_slice(label: np.ndarray) -> int:
    """The axial slice (z) with the most labelled voxels, the middle one when the label is empty."""
    counts = (label > 0).reshape(label.shape[0], -1).sum(1)
    return int(np.argmax(counts)) if counts.any() else label.shape[0] // 2


def save_overlay(path: Path, image: np.ndarray, panels: Sequence[tuple[str, np.ndarray]], structures: Sequence[str],
                 title: str = "", heatmap: tuple[str, np.ndarray] | None = None, z: int | None = None,
                 window: tuple[float, float] | None = None) -> Path:
    """One row of panels on slice z: the image alone, then each (name, class-index map) over it, then an optional
    heat map (e.g. member disagreement). Arrays are (z, y, x); rows are drawn with y downwards. `window` is the
    grey-level range (e.g. a CT soft-tissue window); by default the slice's 1-99 percentiles."""
    z = busiest_slice(panels[0][1]) if z is None else z
    columns = 1 + len(panels) + (heatmap is not None)
    fig, axes = plt.subplots(1, columns, figsize=(3.2 * columns, 3.6), squeeze=False)
    lo, hi = window if window else np.percentile(image[z], [1, 99])
    cmap = ListedColormap(PALETTE[: max(1, len(structures))])
    axes[0, 0].imshow(image[z], cmap="gray", vmin=lo, vmax=hi)
    axes[0, 0].set_title("image")
    for ax, (name, labels) in zip(axes[0, 1:], panels):
        ax.imshow(image[z], cmap="gray", vmin=lo, vmax=hi)
        masked = np.ma.masked_where(labels[z] == 0, labels[z] - 1)
        ax.imshow(masked, cmap=cmap, vmin=0, vmax=max(1, len(structures)) - 1 + 1e-6, alpha=0.5,
                  interpolation="nearest")
        ax.set_title(name)
    if heatmap is not None:
        name, values = heatmap
        axes[0, -1].imshow(image[z], cmap="gray", vmin=lo, vmax=hi)
        shown = axes[0, -1].imshow(values[z], cmap="inferno", alpha=0.7, vmin=0, vmax=max(float(values.max()), 1e-3))
        axes[0, -1].set_title(name)
        fig.colorbar(shown, ax=axes[0, -1], fraction=0.046)
    for ax in axes[0]:
        ax.axis("off")
    handles = [plt.Rectangle((0, 0), 1, 1, color=PALETTE[i % len(PALETTE)]) for i in range(len(structures))]
    fig.legend(handles, structures, loc="lower center", ncol=len(structures), frameon=False)
    fig.suptitle(f"{title} (axial slice {z})")
    fig.tight_layout(rect=(0, 0.06, 1, 0.95))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
