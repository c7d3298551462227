"""From files to network inputs: MONAI dictionary transforms.

`LoadCased` reads a case's images (SimpleITK), puts every input modality on the reference modality's grid at the
plan's spacing (by world coordinates), normalises each modality by its type and maps label values to class indices.
The result carries the grid it lives on (`"grid"`) so predictions can be mapped back to any input's own geometry.
Random patch sampling: labelled patches are balanced over the classes (so small structures are seen); unlabelled
patches are cropped at random without reading any label.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from monai.transforms import (
    BorderPad,
    ClassesToIndices,
    Compose,
    MapTransform,
    RandAffined,
    RandCropByLabelClassesd,
    RandGaussianNoised,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropSamplesd,
)

from ..errors import UserError
from .geometry import grid_with_spacing, resample_to_grid
from .io import Geometry, ImageError, beyond_float32, read_image, to_array
from .plan import Plan
from .spec import IGNORE_INDEX, Case, LabelSet


class LabelValueError(UserError):
    """A label holds values that the dataset spec does not name."""


def values_to_indices(label: np.ndarray, label_values: Sequence[int], name: str = "label",
                      ignore_value: int | None = None) -> np.ndarray:
    """Maps on-disk label values to class indices 0..K-1, and `ignore_value` to IGNORE_INDEX; unknown values raise
    LabelValueError."""
    if not np.all(np.isfinite(label)) or not np.all(np.equal(np.mod(label, 1), 0)):
        raise LabelValueError(f"{name}: label voxels must be whole numbers (found fractional or NaN values)")
    label = label.astype(np.int64)
    lut_size = max(int(label.max(initial=0)), max(label_values), ignore_value or 0) + 1
    if label.min(initial=0) < 0:
        raise LabelValueError(f"{name}: negative label values {sorted(set(np.unique(label[label < 0]).tolist()))}")
    unknown_value = IGNORE_INDEX - 1
    lut = np.full(lut_size, unknown_value, dtype=np.int64)
    for index, value in enumerate(label_values):
        lut[value] = index
    if ignore_value is not None:
        lut[ignore_value] = IGNORE_INDEX
    out = lut[label]
    if (out == unknown_value).any():
        unknown = sorted(set(np.unique(label[out == unknown_value]).tolist()))
        allowed = [*label_values, *([] if ignore_value is None else [ignore_value])]
        raise LabelValueError(f"{name}: label values {unknown} are not in the dataset spec (allowed: "
                              f"{', '.join(map(str, allowed))}); fix the label, add them to 'labels', or name "
                              f"voxels of unknown class \"ignore\" there")
    return out


def reference_grid(image: sitk.Image, plan: Plan) -> Geometry:
    """The grid a case is processed on: the reference image's box, origin and direction at the plan spacing."""
    return grid_with_spacing(Geometry.of(image), plan.spacing[::-1])


def load_case_arrays(images: Mapping[str, sitk.Image | str | Path], modalities: Sequence[str], plan: Plan,
                     label: sitk.Image | str | Path | None = None, label_values: Sequence[int] | None = None,
                     ignore_value: int | None = None) -> dict[str, Any]:
    """Stacks `modalities` (first = reference grid) into a (C, Z, Y, X) float32 array on the plan's grid.

    Returns {"image", "grid"} and, with a label, {"label": (1, Z, Y, X) int64 class indices}.
    """
    missing = [m for m in modalities if m not in images]
    if missing:
        raise ImageError(f"missing modality {', '.join(missing)}: this model needs {', '.join(modalities)}")
    loaded = {m: images[m] if isinstance(images[m], sitk.Image) else read_image(images[m]) for m in modalities}
    grid = reference_grid(loaded[modalities[0]], plan)
    channels = []
    for m in modalities:
        beyond = beyond_float32(sitk.GetArrayViewFromImage(loaded[m]))
        if beyond:  # the cast below would make them infinite, and the message below blame NaN/Inf
            raise ImageError(f"{m}: the image has {beyond} voxel(s) beyond float32's range (|value| > 3.4e38); "
                             f"rescale or clip it before training or prediction")
        image = sitk.Cast(loaded[m], sitk.sitkFloat32)
        array = to_array(image)
        if not np.isfinite(array).all():
            raise ImageError(f"{m}: the image has {int((~np.isfinite(array)).sum())} NaN/Inf voxels; "
                             f"fix or mask them before training or prediction")
        resampled = resample_to_grid(image, grid, "linear", default=float(array.min()))
        channels.append(plan.normalisation[m].apply(array if resampled is image else to_array(resampled)))
    # One channel: a view, not a copy (300 MB for a 512 x 512 x 300 CT).
    image = channels[0][None] if len(channels) == 1 else np.stack(channels)
    out: dict[str, Any] = {"image": image.astype(np.float32, copy=False), "grid": grid}
    if label is not None:
        label_image = label if isinstance(label, sitk.Image) else read_image(label)
        label_image = resample_to_grid(label_image, grid, "nearest", default=0)
        out["label"] = values_to_indices(to_array(label_image, np.float64), label_values or [0, 1],
                                         name=str(label if not isinstance(label, sitk.Image) else "label"),
                                         ignore_value=ignore_value)[None]
    return out


class LoadCased(MapTransform):
    """{"case": Case} -> {"image", "label"?, "grid", "case_id"} for the given modalities."""

    def __init__(self, modalities: Sequence[str], plan: Plan, labels: LabelSet, use_label: bool = True):
        super().__init__(keys=["case"])
        self.modalities, self.plan, self.labels, self.use_label = list(modalities), plan, labels, use_label

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        case: Case = data["case"]
        label = case.label_for(self.modalities[0]) if self.use_label else None
        out = load_case_arrays(case.images, self.modalities, self.plan, label, self.labels.label_values,
                               self.labels.ignore_value)
        out["case_id"] = case.id
        return out


def augmentations(keys: Sequence[str], image_keys: Sequence[str], label_keys: Sequence[str]) -> list:
    """Mild intensity and spatial augmentation (no mirroring: left/right position is a real cue in anatomy)."""
    modes = ["bilinear" if k in image_keys else "nearest" for k in keys]
    return [
        RandAffined(keys=list(keys), prob=0.2, rotate_range=(0.26, 0.26, 0.26), scale_range=(0.15, 0.15, 0.15),
                    mode=modes, padding_mode="border"),
        RandScaleIntensityd(keys=list(image_keys), factors=0.1, prob=0.5),
        RandShiftIntensityd(keys=list(image_keys), offsets=0.1, prob=0.5),
        RandGaussianNoised(keys=list(image_keys), prob=0.15, std=0.1),
    ]


CLASS_INDICES = "label_cls_indices"


def patch_ready(item: dict[str, Any], plan: Plan, num_classes: int | None = None) -> dict[str, Any]:
    """A loaded case made ready for patch sampling, once: image (edge values) and label (background) padded to at
    least the patch size, and for a labelled case where each class lies (MONAI's ClassesToIndices), so that
    class-balanced cropping does not scan the whole volume for every batch (on a CPU that scan cost more than the
    training step itself: backend/benchmarks/RESULTS.md)."""
    shape = np.asarray(item["image"].shape[1:])
    missing = np.maximum(np.asarray(plan.patch_size) - shape, 0)
    out = dict(item)
    if missing.any():
        border = [int(v) for m in missing for v in (m // 2, m - m // 2)]
        out["image"] = np.asarray(BorderPad(border, mode="edge")(item["image"]))
        if "label" in item:
            out["label"] = np.asarray(BorderPad(border, mode="constant")(item["label"]))
    if num_classes is not None and "label" in out:
        out[CLASS_INDICES] = [np.asarray(i) for i in ClassesToIndices(num_classes=num_classes)(out["label"])]
    return out


def class_ratios(num_classes: int, foreground_fraction: float) -> list[float]:
    """Sampling weights of the patch centres' classes: `foreground_fraction` of the patches centred on a structure,
    every structure equally often (so small ones are seen as often as large ones), the rest on background (which,
    being most of the image, means anywhere: what keeps false positives far from the structures in check)."""
    structures = num_classes - 1
    if structures == 0 or foreground_fraction >= 1:
        return [0.0] + [1.0] * structures if structures else [1.0]
    return [structures * (1 - foreground_fraction) / max(foreground_fraction, 1e-6)] + [1.0] * structures


def labelled_patch_transform(plan: Plan, num_classes: int) -> Compose:
    """`plan.batch_size` patches of one patch-ready case (see patch_ready), their centres drawn by
    class_ratios, augmented when the plan says so."""
    keys = ["image", "label"]
    return Compose([
        RandCropByLabelClassesd(keys=keys, label_key="label", spatial_size=list(plan.patch_size),
                                ratios=class_ratios(num_classes, plan.foreground_fraction), num_classes=num_classes,
                                num_samples=plan.batch_size, indices_key=CLASS_INDICES, warn=False),
        *(augmentations(keys, ["image"], ["label"]) if plan.augment else []),
    ])


def unlabelled_patch_transform(plan: Plan) -> Compose:
    """`plan.batch_size` random patches of a patch-ready unlabelled case: never touches a label."""
    return Compose([
        RandSpatialCropSamplesd(keys=["image"], roi_size=list(plan.patch_size), num_samples=plan.batch_size,
                                random_size=False),
        *(augmentations(["image"], ["image"], []) if plan.augment else []),
    ])
