"""Dataset check: every problem that would stop or corrupt training, found before training starts.

`check_dataset` never raises; it reads each file once and inspects voxels in slabs of slices, so one image is in
memory at a time (a 512x512x300 volume costs its own size plus a few MB). Errors fail the check; warnings
(`dataset_warnings`) are reported but do not.

NaN/Inf are found in .mha/.nrrd files; ITK 5's NIfTI reader (SimpleITK 2.x) turns them into 0 while reading, so
training never sees them in NIfTI files and neither can this check.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .io import Geometry, ImageError, beyond_float32, read_image, slabs
from .spec import DatasetError, DatasetSpec, is_ignore, load_spec, spec_path

_MAX_VALUES = 1000  # distinct offending label values kept; a wrong file (an image given as label) has millions
_SHOWN_VALUES = 10

Report = Callable[[str], None]


@dataclass
class Problem:
    case: str | None
    modality: str | None
    message: str

    def __str__(self) -> str:
        where = " ".join(s for s in (self.case, f"[{self.modality}]" if self.modality else None) if s)
        return f"{where}: {self.message}" if where else self.message


def check_dataset(path: str | Path) -> tuple[DatasetSpec | None, list[Problem]]:
    """Loads the spec at `path` (folder or dataset.json) and returns it with every error found (empty: usable).
    The spec is None when dataset.json itself cannot be used; then the one problem says why."""
    try:
        spec = load_spec(path)
    except DatasetError as e:
        return None, [Problem(None, None, str(e))]
    except (OSError, UnicodeDecodeError) as e:  # unreadable file: still a report, not a crash
        return None, [Problem(None, None, f"cannot read {spec_path(path)}: {e}")]

    if not spec.cases:
        return spec, [Problem(None, None, "the dataset has no cases; add at least one entry to 'cases'")]
    problems: list[Problem] = []
    if not any(c.labelled for c in spec.cases):
        problems.append(Problem(None, None, "no case has a label: nothing to train on (label at least one case)"))

    allowed = sorted(set(spec.labels.values()))
    # Per-file results keyed by path, so a file listed twice (one label shared by co-registered modalities) is
    # read and reported once.
    image_geometry: dict[Path, Geometry | None] = {}
    label_geometry: dict[Path, Geometry | None] = {}
    for case in spec.cases:
        def report(modality: str, case_id: str = case.id) -> Report:
            return lambda message: problems.append(Problem(case_id, modality, message))

        for modality, file in case.images.items():
            if file not in image_geometry:
                image_geometry[file] = _inspect(file, spec.root, "image", allowed, report(modality))
        for modality, file in case.labels.items():
            if file not in label_geometry:
                label_geometry[file] = _inspect(file, spec.root, "label", allowed, report(modality))
            label, image = label_geometry[file], image_geometry.get(case.images[modality])
            if label is not None and image is not None and not label.matches(image):
                problems.append(Problem(case.id, modality, _geometry_message(label, image)))
    return spec, problems


def dataset_warnings(spec: DatasetSpec) -> list[Problem]:
    """Oddities that do not stop training: modalities declared in the spec but used by no case, and images that
    count as unlabelled because their case's label belongs to another, not co-registered, image."""
    used = {m for c in spec.cases for m in c.images}
    warnings = [Problem(None, m, f"modality {m!r} is declared in 'modalities' but no case has a {m!r} image")
                for m in spec.modalities if m not in used]
    for case in spec.cases:
        for m in case.unshared_labels():
            warnings.append(Problem(case.id, m, f"no {m!r} label: the case's label ({', '.join(case.labels)}) is "
                                                f"not shared, so this image counts as unlabelled; if the case's "
                                                f"images are co-registered, add \"co_registered\": true to the case"))
    return warnings


def format_report(spec: DatasetSpec | None, problems: list[Problem], warnings: list[Problem] | None = None) -> str:
    """A human-readable summary; warnings default to `dataset_warnings(spec)`."""
    lines: list[str] = []
    if spec is None:
        lines.append("dataset.json could not be loaded")
    else:
        lines.append(f"dataset {spec.name!r}: {len(spec.cases)} case(s) at {spec.root}")
        lines.append("structures: " + ", ".join(f"{n}={v}" for n, v in spec.labels.items() if not is_ignore(n)))
        if spec.ignore_value is not None:
            lines.append(f"ignore={spec.ignore_value}: voxels of unknown class, left out of training and scoring")
        for m, kind in spec.modalities.items():
            lines.append(f"  {m} ({kind}): {len(spec.cases_with(m, labelled=True))} labelled, "
                         f"{len(spec.cases_with(m, labelled=False))} unlabelled")
        shared = sum(1 for c in spec.cases if c.co_registered and len(c.images) > 1)
        if shared:
            lines.append(f"  {shared} case(s) declare co-registered images: one label serves all their modalities")
        if warnings is None:
            warnings = dataset_warnings(spec)
    if problems:
        lines.append(f"{len(problems)} problem(s):")
        lines += [f"  - {p}" for p in problems]
    else:
        lines.append("no problems found")
    if warnings:
        lines.append(f"{len(warnings)} warning(s):")
        lines += [f"  - warning: {w}" for w in warnings]
    return "\n".join(lines)


# ---- per-file inspection -----------------------------------------------------------------------------------------
def _inspect(path: Path, root: Path, kind: str, allowed: list[int], report: Report) -> Geometry | None:
    """Reads one file and reports its problems; returns its geometry, or None when it cannot be read."""
    shown = _shown_path(path, root)
    try:
        found = path.exists()
    except OSError as e:  # a name too long for the file system, say: Path.exists raises rather than say False
        report(f"{kind} {shown}: cannot be read ({e.strerror})")
        return None
    if not found:
        report(f"{kind} file not found: {shown}")
        return None
    try:
        image = read_image(path)
        if kind == "image":
            _check_finite(image, shown, report)
        else:
            _check_label_values(image, shown, allowed, report)
        return Geometry.of(image)
    except ImageError as e:
        report(f"{kind} {str(e).replace(str(path), shown, 1)}")
    except Exception as e:  # the check must report, never raise (odd pixel types, out of memory, ...)
        report(f"{kind} {shown}: could not be checked: {type(e).__name__}: {e}")
    return None


def _check_finite(image: sitk.Image, shown: str, report: Report) -> None:
    for problem in VoxelCensus.of(image).problems(f"image {shown}"):
        report(problem)


def _check_label_values(image: sitk.Image, shown: str, allowed: list[int], report: Report) -> None:
    for problem in LabelCensus.of(image, allowed).problems(f"label {shown}"):
        report(problem)


# ---- what is wrong with an image's voxels: for this check and for the service's upload check -----------------------
@dataclass
class VoxelCensus:
    """NaN, infinite and beyond-float32 voxels of an image (training computes in float32), counted slab by slab."""
    voxels: int
    nan: int = 0
    inf: int = 0
    beyond_float32: int = 0

    @classmethod
    def of(cls, image: sitk.Image) -> "VoxelCensus":
        census = cls(_voxels(image))
        if image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
            return census  # integer images cannot hold NaN/Inf
        for slab in slabs(image):
            census.nan += int(np.count_nonzero(np.isnan(slab)))
            census.inf += int(np.count_nonzero(np.isinf(slab)))
            census.beyond_float32 += beyond_float32(slab)
        return census

    def problems(self, shown: str) -> list[str]:
        """One message per kind of problem; `shown` names the image ("image case000/ct.nii.gz")."""
        problems = []
        if self.nan or self.inf:
            counts = " and ".join(s for s in (f"{self.nan} NaN" if self.nan else "",
                                              f"{self.inf} infinite" if self.inf else "") if s)
            problems.append(f"{shown} has {counts} voxel(s) (of {self.voxels}); replace them (e.g. with the minimum "
                            f"intensity) before training")
        if self.beyond_float32:
            problems.append(f"{shown} has {self.beyond_float32} voxel(s) (of {self.voxels}) beyond float32's range "
                            f"(|value| > 3.4e38); rescale or clip it before training")
        return problems


@dataclass
class LabelCensus:
    """Voxels of a label map that are not whole numbers, and the distinct values `allowed` does not hold (the first
    _MAX_VALUES of them: an image given as a label has millions), counted slab by slab."""
    allowed: list[int]
    non_integer: int = 0
    example: float | None = None
    unknown: np.ndarray = field(default_factory=lambda: np.empty(0))
    more: bool = False

    @classmethod
    def of(cls, image: sitk.Image, allowed: list[int]) -> "LabelCensus":
        census = cls(list(allowed))
        allowed_values = np.asarray(allowed, dtype=np.int64)
        for slab in slabs(image):
            if slab.dtype.kind == "f":
                bad = ~np.isfinite(slab) | (slab != np.round(slab))
                if bad.any():
                    census.non_integer += int(np.count_nonzero(bad))
                    census.example = float(slab[bad][0]) if census.example is None else census.example
                    slab = slab[~bad]
            values = _distinct(slab)
            values = values[~np.isin(values, allowed_values)]
            if values.size and not census.more:
                census.unknown = np.union1d(census.unknown, values)
                if census.unknown.size > _MAX_VALUES:
                    census.unknown, census.more = census.unknown[:_MAX_VALUES], True
        return census

    def problems(self, shown: str) -> list[str]:
        """One message per kind of problem; `shown` names the label map ("label case000/ct_label.nii.gz")."""
        problems = []
        if self.non_integer:
            problems.append(f"{shown} has {self.non_integer} non-integer voxel(s) (e.g. {self.example:g}); labels "
                            f"must hold integer values (resample labels with nearest-neighbour interpolation)")
        if self.unknown.size:
            values = ", ".join(_fmt(v) for v in self.unknown[:_SHOWN_VALUES])
            if self.more or self.unknown.size > _SHOWN_VALUES:
                values += f", ... ({'more than ' if self.more else ''}{self.unknown.size} distinct)"
            problems.append(f"label values {{{values}}} are not in the dataset's labels (allowed: "
                            f"{', '.join(map(str, self.allowed))}); map them to the dataset's structures first")
        return problems


def _distinct(values: np.ndarray) -> np.ndarray:
    """Sorted distinct values; a histogram for integers of a small range (much faster than sorting)."""
    flat = values.ravel()
    if flat.size == 0:
        return flat
    if flat.dtype.kind in "ui" and flat.dtype.itemsize <= 4:
        lo, hi = int(flat.min()), int(flat.max())
        if hi - lo < 1 << 16:
            return np.flatnonzero(np.bincount(flat.astype(np.int64) - lo)) + lo
    return np.unique(flat)


def _fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{float(value):g}"


def _voxels(image: sitk.Image) -> int:
    return int(np.prod(image.GetSize()))


def _geometry_message(label: Geometry, image: Geometry) -> str:
    message = f"label geometry differs from its image: label {label.describe()}; image {image.describe()}"
    if not np.allclose(label.direction, image.direction, atol=1e-4):
        message += f"; directions differ (label {_fmt_dir(label)}, image {_fmt_dir(image)})"
    return message + " (resample the label onto its image's grid with nearest-neighbour interpolation)"


def _fmt_dir(geometry: Geometry) -> str:
    return "(" + ", ".join(f"{d:.3g}" for d in geometry.direction) + ")"


def _shown_path(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)
