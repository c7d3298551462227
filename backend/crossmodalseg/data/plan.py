"""The preprocessing plan: target spacing, patch size, network topology and per-modality normalisation.

Derived once from the training data's statistics (spacings, sizes, intensities), stored in the model folder, and
applied unchanged at inference: configuration is data that flows one way, as in nnU-Net.

Conventions: every spatial quantity in the plan is in array order (z, y, x), as SimpleITK's GetArrayFromImage returns.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

from .io import read_image, to_array
from .spec import DatasetSpec


@dataclass(frozen=True)
class Preset:
    """Network width and patch budget. `fast` fits a CPU or a small GPU; `full` is the accuracy setting on a GPU."""

    name: str
    filters: tuple[int, ...]
    max_patch: tuple[int, int, int]  # largest patch edge per axis (z, y, x)
    max_patch_voxels: int
    batch_size: int
    max_image_edge: int | None  # coarsen the spacing until the median image has at most this many voxels per axis
    iterations_per_epoch: int
    learning_rate: float
    deep_supervision_heads: int  # extra low-resolution heads (each costs a full-size loss on CPU)


PRESETS: dict[str, Preset] = {
    "fast": Preset("fast", filters=(16, 32, 64, 128), max_patch=(64, 64, 64), max_patch_voxels=96 * 1024,
                   batch_size=2, max_image_edge=128, iterations_per_epoch=25, learning_rate=3e-3,
                   deep_supervision_heads=1),
    "full": Preset("full", filters=(32, 64, 128, 256, 320, 320), max_patch=(128, 160, 160),
                   max_patch_voxels=128 * 128 * 128, batch_size=2, max_image_edge=None, iterations_per_epoch=250,
                   learning_rate=1e-3, deep_supervision_heads=2),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


@dataclass
class Normalisation:
    """How one modality's intensities become network inputs.

    CT: clip to the training foreground's 0.5-99.5 percentiles, then z-score with the foreground mean/std (dataset-
    wide values, so Hounsfield units keep their meaning). MR: z-score inside each image's own foreground.
    """

    modality: str
    kind: str  # "CT" | "MR"
    clip: tuple[float, float] | None = None
    mean: float = 0.0
    std: float = 1.0

    def apply(self, array: np.ndarray) -> np.ndarray:
        array = np.asarray(array, dtype=np.float32)
        if self.kind == "CT":
            lo, hi = self.clip if self.clip else (float(array.min()), float(array.max()))
            return (np.clip(array, lo, hi) - self.mean) / max(self.std, 1e-6)
        fg = foreground_mask(array)
        values = array[fg] if fg.any() else array.ravel()
        return (array - float(values.mean())) / max(float(values.std()), 1e-6)


def foreground_mask(array: np.ndarray) -> np.ndarray:
    """The body or brain: voxels other than the background fill when a skull-stripped or padded image has one,
    else above an Otsu threshold."""
    low = array.min()
    at_low = array == low
    if at_low.mean() > 0.1:
        return ~at_low
    image = sitk.GetImageFromArray(array.astype(np.float32))
    mask = sitk.GetArrayFromImage(sitk.OtsuThreshold(image, 0, 1)).astype(bool)
    return mask if mask.any() else np.ones_like(array, dtype=bool)


@dataclass
class Plan:
    preset: str
    spacing: list[float]  # target spacing (z, y, x) mm
    patch_size: list[int]  # (z, y, x)
    strides: list[list[int]]  # per network level, (z, y, x)
    kernels: list[list[int]]
    filters: list[int]
    batch_size: int
    iterations_per_epoch: int
    learning_rate: float
    deep_supervision_heads: int
    normalisation: dict[str, Normalisation] = field(default_factory=dict)
    statistics: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["normalisation"] = {m: asdict(n) for m, n in self.normalisation.items()}
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Plan":
        data = dict(data)
        data["normalisation"] = {
            m: Normalisation(**{**n, "clip": tuple(n["clip"]) if n.get("clip") else None})
            for m, n in data.get("normalisation", {}).items()
        }
        return cls(**data)

    def with_preset(self, preset: Preset) -> "Plan":
        return plan_from_statistics(self.statistics, preset, self.normalisation)


def collect_statistics(spec: DatasetSpec, modalities: list[str], max_samples_per_case: int = 20000,
                       seed: int = 0) -> dict[str, Any]:
    """Spacings and sizes of the reference modality's images, and CT foreground intensity percentiles."""
    rng = np.random.default_rng(seed)
    reference = modalities[0]
    spacings, sizes = [], []
    intensities: dict[str, list[np.ndarray]] = {m: [] for m in modalities if spec.modalities[m] == "CT"}
    for case in spec.cases:
        if reference in case.images:
            image = read_image(case.images[reference])
            spacings.append(list(image.GetSpacing())[::-1])
            sizes.append(list(image.GetSize())[::-1])
        for m in intensities:
            label_path = case.label_for(m)
            if m not in case.images or label_path is None:
                continue
            image = read_image(case.images[m])
            array = to_array(image)
            label = to_array(_label_on(read_image(label_path), image), np.int64)
            values = array[label > 0]
            if values.size == 0:
                values = array[foreground_mask(array)]
            if values.size > max_samples_per_case:
                values = rng.choice(values, max_samples_per_case, replace=False)
            intensities[m].append(values)
    if not spacings:
        raise ValueError(f"no case has a {reference!r} image to plan from")
    stats: dict[str, Any] = {"spacings": spacings, "sizes": sizes, "intensity": {}}
    for m, chunks in intensities.items():
        values = np.concatenate(chunks) if chunks else np.zeros(1, np.float32)
        stats["intensity"][m] = {"p00_5": float(np.percentile(values, 0.5)), "p99_5": float(np.percentile(values, 99.5)),
                                 "mean": float(values.mean()), "std": float(values.std())}
    return stats


def _label_on(label: sitk.Image, image: sitk.Image) -> sitk.Image:
    from .geometry import resample_to_grid

    return resample_to_grid(label, image, "nearest")


def make_plan(spec: DatasetSpec, modalities: list[str], preset: str | Preset = "fast") -> Plan:
    """The plan for training a member on `modalities` (the first is the reference grid) of `spec`."""
    preset = get_preset(preset) if isinstance(preset, str) else preset
    stats = collect_statistics(spec, modalities)
    normalisation = {}
    for m in modalities:
        kind = spec.modalities[m]
        if kind == "CT":
            s = stats["intensity"][m]
            clipped_std = s["std"]
            normalisation[m] = Normalisation(m, "CT", (s["p00_5"], s["p99_5"]), s["mean"], clipped_std)
        else:
            normalisation[m] = Normalisation(m, "MR")
    return plan_from_statistics(stats, preset, normalisation)


def plan_from_statistics(stats: dict[str, Any], preset: Preset, normalisation: dict[str, Normalisation]) -> Plan:
    spacings = np.asarray(stats["spacings"], dtype=float)
    sizes = np.asarray(stats["sizes"], dtype=float)
    spacing = np.median(spacings, axis=0)
    # nnU-Net's rule for strongly anisotropic data: take a finer out-of-plane spacing than the median.
    worst = int(np.argmax(spacing))
    others = [i for i in range(3) if i != worst]
    if spacing[worst] > 3 * max(spacing[others]):
        spacing[worst] = max(np.percentile(spacings[:, worst], 10), 3 * max(spacing[others]))
    extent = np.median(sizes * spacings, axis=0)  # physical size (mm)
    if preset.max_image_edge:
        # CPU-friendly: coarsen until the median image has at most max_image_edge voxels along every axis.
        spacing = np.maximum(spacing, extent / preset.max_image_edge)
    shape = np.maximum(np.round(extent / spacing), 1).astype(int)
    patch, strides, kernels = network_topology(shape, spacing, preset)
    return Plan(preset=preset.name, spacing=[float(s) for s in spacing], patch_size=patch, strides=strides,
                kernels=kernels, filters=list(preset.filters[: len(strides)]), batch_size=preset.batch_size,
                iterations_per_epoch=preset.iterations_per_epoch, learning_rate=preset.learning_rate,
                deep_supervision_heads=preset.deep_supervision_heads, normalisation=normalisation, statistics=stats)


def network_topology(shape: np.ndarray, spacing: np.ndarray, preset: Preset
                     ) -> tuple[list[int], list[list[int]], list[list[int]]]:
    """Patch size, per-level strides and kernel sizes (nnU-Net's idea, simplified).

    An axis is downsampled only while its spacing is within 2x of the finest axis (so anisotropic data first
    becomes isotropic) and while the patch stays at least 8 voxels long; kernels are 1 along axes still too coarse.
    """
    patch = np.minimum(shape, preset.max_patch).astype(int)
    while np.prod(patch) > preset.max_patch_voxels:
        patch[int(np.argmax(patch / np.asarray(preset.max_patch)))] -= 8
    patch = np.maximum(patch, 8)
    max_levels = len(preset.filters) - 1
    current_spacing = np.asarray(spacing, dtype=float).copy()
    current_size = patch.astype(float).copy()
    strides, kernels = [[1, 1, 1]], []
    kernels.append([3 if s <= 2 * current_spacing.min() else 1 for s in current_spacing])
    for _ in range(max_levels):
        fine = current_spacing <= 2 * current_spacing.min()
        can = fine & (current_size >= 8)  # the coarsest feature map keeps at least 4 voxels per axis
        if not can.any():
            break
        stride = [2 if c else 1 for c in can]
        current_spacing = current_spacing * np.asarray(stride)
        current_size = current_size / np.asarray(stride)
        strides.append(stride)
        kernels.append([3 if s <= 2 * current_spacing.min() else 1 for s in current_spacing])
    divisor = np.prod(np.asarray(strides), axis=0)
    patch = np.maximum((patch // divisor) * divisor, divisor)
    return [int(p) for p in patch], strides, kernels
