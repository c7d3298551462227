"""Importers from the nnU-Net v2 raw and Medical Segmentation Decathlon (MSD) layouts into CrossModalSeg's.

Each importer validates the whole source first (dataset.json, every file, image headers) and raises DatasetError
listing what to fix before anything is written; then it copies the files under `dst/<case>/` and writes
`dst/dataset.json` last, so a dataset.json in `dst` always means a finished import.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from .gate import ImageError
from .io import gated_reader, read_image, write_image
from .spec import (
    MODALITY_TYPES,
    SPEC_FILE,
    Case,
    DatasetError,
    DatasetSpec,
    load_spec,
    parse_spec,
)

# Single-file 3D formats only: a header/data pair (.mhd/.nhdr) would lose its data file when copied alone.
_FILE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha")
_LABEL_STEM = "label"  # dst/<case>/label<ext>; a modality of that name is renamed (see _modalities)
_MAX_LISTED = 10


@dataclass
class _Plan:
    """What an import will write: 3D copies, and 4D/multi-component files split into one file per channel."""

    cases: list[Case] = field(default_factory=list)
    copies: list[tuple[Path, Path]] = field(default_factory=list)
    splits: list[tuple[Path, list[Path]]] = field(default_factory=list)
    checked: set[Path] = field(default_factory=set)  # sources the image gate has passed already


# ---- nnU-Net v2 ----------------------------------------------------------------------------------------------------
def import_nnunet(src: str | Path, dst: str | Path, modality_types: dict[str, str] | None = None,
                  overwrite: bool = False) -> DatasetSpec:
    """Imports an nnU-Net v2 raw dataset (`dataset.json`, `imagesTr/{case}_{XXXX}{ending}`, `labelsTr/{case}{ending}`,
    optional unlabelled `imagesTs/`). Channels become modalities (lower-cased names; "CT" is CT, others MR unless
    `modality_types` says otherwise, keyed by channel or modality name); a case's one label is listed under each of
    its modalities (nnU-Net channels are co-registered)."""
    src, dst = Path(src), Path(dst)
    meta = _source_json(src, "an nnU-Net v2 raw dataset")
    _check_dst(dst, overwrite)
    if "channel_names" not in meta:
        hint = (" (this looks like an MSD / nnU-Net v1 dataset.json with 'modality': use import_msd)"
                if "modality" in meta else "")
        raise DatasetError(f"{src / SPEC_FILE}: missing 'channel_names', e.g. {{\"0\": \"CT\"}}{hint}")
    if "dataset" in meta:
        raise DatasetError(f"{src / SPEC_FILE}: explicit file lists ('dataset') are not supported; put the files in "
                           f"imagesTr/labelsTr with nnU-Net's standard names")
    modalities = _modalities(meta["channel_names"], modality_types, src)
    labels = _nnunet_labels(meta.get("labels"), src)
    ending = meta.get("file_ending")
    if ending not in _FILE_ENDINGS:
        raise DatasetError(f"{src / SPEC_FILE}: 'file_ending' is {ending!r}; CrossModalSeg imports 3D volumes with one "
                           f"of {', '.join(_FILE_ENDINGS)}")
    if not (src / "imagesTr").is_dir():
        raise DatasetError(f"{src}: no imagesTr folder (nnU-Net v2 keeps training images in imagesTr/)")

    errors: list[str] = []
    train = _nnunet_channels(src / "imagesTr", ending, modalities, errors)
    label_dir = src / "labelsTr"
    label_ids = {p.name[: -len(ending)] for p in _files(label_dir, ending)}
    errors += [f"missing label {label_dir / (cid + ending)}" for cid in sorted(set(train) - label_ids)]
    errors += [f"label {label_dir / (cid + ending)} has no images in imagesTr"
               for cid in sorted(label_ids - set(train))]
    n_training = meta.get("numTraining")
    if n_training is not None and n_training != len(train):
        errors.append(f"'numTraining' is {n_training!r} but imagesTr holds {len(train)} case(s)")
    test = _nnunet_channels(src / "imagesTs", ending, modalities, errors)
    _raise_if(errors, src)

    plan = _Plan()
    for cid in sorted(train):
        _plan_case(plan, dst, cid, train[cid], ending, label_dir / (cid + ending), modalities)
    for cid in sorted(test):
        new_id = cid
        while new_id in train:  # keep both: test ids may repeat training ids
            new_id = "ts_" + new_id
        _plan_case(plan, dst, new_id, test[cid], ending, None, modalities)
    name = str(meta.get("name") or src.name)
    return _write(plan, name, labels, dict(modalities.values()), src, dst)


def _nnunet_labels(raw: Any, src: Path) -> dict[str, int]:
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(f"{src / SPEC_FILE}: 'labels' must map structure names to integer values, e.g. "
                           f"{{\"background\": 0, \"liver\": 1}}")
    if all(str(k).isdigit() for k in raw) and all(isinstance(v, str) for v in raw.values()):
        raise DatasetError(f"{src / SPEC_FILE}: 'labels' maps values to names (the MSD / nnU-Net v1 format); "
                           f"use import_msd, or write them as name -> value for nnU-Net v2")
    for name, value in raw.items():
        if isinstance(value, (list, tuple)):
            raise DatasetError(f"{src / SPEC_FILE}: label {name!r} is a region ({value}); region-based labels are "
                               f"not supported: convert the labels to one integer value per structure")
        if not isinstance(value, int) or isinstance(value, bool):
            raise DatasetError(f"{src / SPEC_FILE}: label {name!r} has value {value!r}; values must be integers")
    return dict(raw)


def _nnunet_channels(folder: Path, ending: str, modalities: dict[str, tuple[str, str]],
                     errors: list[str]) -> dict[str, dict[str, Path]]:
    """case id -> channel key -> file, from `{case}_{XXXX}{ending}` names; a missing or unknown channel is an error."""
    pattern = re.compile(r"^(.+)_(\d{4})" + re.escape(ending) + "$")
    found: dict[str, dict[str, Path]] = {}
    for path in _files(folder, ending):
        match = pattern.match(path.name)
        if not match:
            errors.append(f"{path}: not named {{case}}_{{XXXX}}{ending} (XXXX: the 4-digit channel)")
            continue
        key = str(int(match.group(2)))
        if key not in modalities:
            errors.append(f"{path}: channel {key} is not in 'channel_names'")
            continue
        found.setdefault(match.group(1), {})[key] = path
    for cid, files in found.items():
        errors += [f"missing image {folder / f'{cid}_{int(k):04d}{ending}'}" for k in modalities if k not in files]
    return found


def _files(folder: Path, ending: str) -> list[Path]:
    """Files with `ending`, without hidden ones (macOS leaves '._name' copies beside the real files)."""
    return sorted(p for p in folder.glob(f"*{ending}") if not p.name.startswith(".")) if folder.is_dir() else []


def _plan_case(plan: _Plan, dst: Path, cid: str, files: dict[str, Path], ending: str, label: Path | None,
               modalities: dict[str, tuple[str, str]]) -> None:
    images = {modalities[key][0]: dst / cid / f"{modalities[key][0]}{ending}" for key in files}
    plan.copies += [(files[key], images[modalities[key][0]]) for key in files]
    case = Case(cid, images, co_registered=True)  # nnU-Net's channels share one grid
    if label is not None:  # one label file, listed under every channel
        target = dst / cid / f"{_LABEL_STEM}{ending}"
        plan.copies.append((label, target))
        case.labels = {m: target for m in images}
    plan.cases.append(case)


# ---- Medical Segmentation Decathlon ------------------------------------------------------------------------------
def import_msd(src: str | Path, dst: str | Path, modality_types: dict[str, str] | None = None,
               overwrite: bool = False) -> DatasetSpec:
    """Imports an MSD task folder (`dataset.json` with 'modality', 'labels' value -> name, 'training' image/label
    pairs and 'test' images). Multi-modal 4D images are split into `dst/<case>/<modality>.nii.gz` (geometry of the
    first three axes kept); 3D images and labels are copied."""
    src, dst = Path(src), Path(dst)
    meta = _source_json(src, "an MSD task")
    _check_dst(dst, overwrite)
    if "modality" not in meta:
        hint = " (this looks like an nnU-Net v2 dataset.json: use import_nnunet)" if "channel_names" in meta else ""
        raise DatasetError(f"{src / SPEC_FILE}: missing 'modality', e.g. {{\"0\": \"CT\"}}{hint}")
    modalities = _modalities(meta["modality"], modality_types, src)
    labels = _msd_labels(meta.get("labels"), src)
    training, test = meta.get("training"), meta.get("test", [])
    if not isinstance(training, list) or not isinstance(test, list):
        raise DatasetError(f"{src / SPEC_FILE}: 'training' must be a list of {{\"image\": ..., \"label\": ...}} and "
                           f"'test' a list of image paths")

    errors: list[str] = []
    pairs: list[tuple[Path, Path | None]] = []
    for i, entry in enumerate(training):
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) or not isinstance(
                entry.get("label"), str):
            errors.append(f"'training' entry #{i} needs 'image' and 'label' paths")
            continue
        pairs.append((_inside(src, entry["image"], errors), _inside(src, entry["label"], errors)))
    for i, entry in enumerate(test):
        image = entry.get("image") if isinstance(entry, dict) else entry  # some tasks list {"image": ...}
        if not isinstance(image, str):
            errors.append(f"'test' entry #{i} must be an image path")
            continue
        pairs.append((_inside(src, image, errors), None))
    _raise_if(errors, src)
    for image, label in pairs:
        errors += [f"missing file {p}" for p in (image, label) if p is not None and not p.is_file()]
    _raise_if(errors, src)

    names = [name for name, _ in modalities.values()]
    plan, seen = _Plan(), set()
    for image, label in pairs:
        cid = _stem(image)
        if label is None:
            while cid in seen:  # a test image named like a training one
                cid = "ts_" + cid
        elif cid in seen:
            errors.append(f"two training cases are named {cid!r}")
        seen.add(cid)
        dim, count = _header(image, errors)
        plan.checked.add(image)
        if dim not in (3, 4):
            errors.append(f"{image}: a {dim}D image; CrossModalSeg needs 3D volumes (4D for several modalities)")
        elif count not in (-1, len(names)):
            errors.append(f"{image}: 'modality' names {len(names)} modalit{'y' if len(names) == 1 else 'ies'} but "
                          f"the image has {count} channel(s)")
        if len(names) == 1 and dim == 3:  # a 3D file: copied as is
            case = Case(cid, {names[0]: dst / cid / f"{names[0]}{_suffix(image)}"})
            plan.copies.append((image, case.images[names[0]]))
        else:
            case = Case(cid, {m: dst / cid / f"{m}.nii.gz" for m in names}, co_registered=True)  # 4D channels
            plan.splits.append((image, list(case.images.values())))
        if label is not None:
            target = dst / cid / f"{_LABEL_STEM}{_suffix(label)}"
            plan.copies.append((label, target))
            case.labels = {m: target for m in names}
        plan.cases.append(case)
    _raise_if(errors, src)
    name = str(meta.get("name") or src.name)
    return _write(plan, name, labels, dict(modalities.values()), src, dst)


def _msd_labels(raw: Any, src: Path) -> dict[str, int]:
    if not isinstance(raw, dict) or not raw:
        raise DatasetError(f"{src / SPEC_FILE}: 'labels' must map values to names, e.g. {{\"0\": \"background\", "
                           f"\"1\": \"liver\"}}")
    out: dict[str, int] = {}
    for value, name in raw.items():
        if not str(value).isdigit() or not isinstance(name, str):
            raise DatasetError(f"{src / SPEC_FILE}: label entry {value!r}: {name!r} is not value -> name (MSD labels "
                               f"look like {{\"0\": \"background\", \"1\": \"liver\"}})")
        if name in out:
            raise DatasetError(f"{src / SPEC_FILE}: two labels are named {name!r}; give each structure its own name")
        out[name] = int(value)
    return dict(sorted(out.items(), key=lambda item: item[1]))


def _inside(src: Path, relative: str, errors: list[str]) -> Path:
    """`relative` under `src`; an absolute path or one that climbs out of the task folder is an error (a dataset.json
    must not make the import copy files from elsewhere, e.g. '../../etc/hostname')."""
    path = src / relative
    if Path(relative).is_absolute() or not path.resolve().is_relative_to(src.resolve()):
        errors.append(f"{relative!r} points outside {src}; keep the task's files inside its folder")
    return path


def _header(path: Path, errors: list[str]) -> tuple[int, int]:
    """(dimension, channels) from the header alone, through the image gate (detached headers, size bombs and
    truncated files refused): a 4D image's 4th axis, or a vector image's components."""
    try:
        with gated_reader(path) as reader:
            reader.ReadImageInformation()
    except ImageError as e:
        errors.append(str(e))
        return 3, -1  # reported; skip the dimension checks
    except RuntimeError:
        errors.append(f"{path}: not a readable image (corrupt or unsupported format)")
        return 3, -1
    dim, components = reader.GetDimension(), reader.GetNumberOfComponents()
    return dim, (reader.GetSize()[3] if dim == 4 else 1) * components  # 4D with one channel is split too


def _split(path: Path, targets: list[Path]) -> None:
    """Writes channel c of a 4D (x, y, z, c) or multi-component image to targets[c], with the 3D geometry."""
    image = read_image(path, require_3d=False)  # through the gate again: the file may have changed since the check
    if image.GetNumberOfComponentsPerPixel() > 1:
        for c, target in enumerate(targets):
            write_image(sitk.VectorIndexSelectionCast(image, c), target)
        return
    array = sitk.GetArrayViewFromImage(image)  # (c, z, y, x), no copy
    direction = np.asarray(image.GetDirection()).reshape(4, 4)[:3, :3].ravel()
    for c, target in enumerate(targets):
        channel = sitk.GetImageFromArray(array[c])
        channel.SetSpacing(image.GetSpacing()[:3])
        channel.SetOrigin(image.GetOrigin()[:3])
        channel.SetDirection(tuple(direction))
        write_image(channel, target)


# ---- shared ------------------------------------------------------------------------------------------------------
def _source_json(src: Path, what: str) -> dict[str, Any]:
    file = src / SPEC_FILE
    if not file.is_file():
        raise DatasetError(f"no dataset.json in {src}; pass the folder of {what}")
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"{file} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{file} must hold a JSON object")
    return data


def _check_dst(dst: Path, overwrite: bool) -> None:
    if (dst / SPEC_FILE).exists() and not overwrite:
        raise DatasetError(f"{dst} already holds a dataset.json; choose an empty folder or pass overwrite=True")


def _modalities(raw: Any, overrides: dict[str, str] | None, src: Path) -> dict[str, tuple[str, str]]:
    """channel key ("0", "1", ...) -> (modality name, type). Names are lower-cased and sanitised to spec ids."""
    if not isinstance(raw, dict) or not raw or not all(str(k).isdigit() for k in raw):
        raise DatasetError(f"{src / SPEC_FILE}: channels must map channel numbers to names, e.g. "
                           f"{{\"0\": \"T2\", \"1\": \"ADC\"}}")
    overrides = dict(overrides or {})
    out: dict[str, tuple[str, str]] = {}
    used: set[str] = set()
    for key in sorted(raw, key=int):
        original = str(raw[key])
        name = re.sub(r"[^a-z0-9_.-]+", "_", original.lower()).strip("_.-")[:64] or f"ch{int(key)}"
        if name in used or name == _LABEL_STEM:
            name = f"{name}_{int(key)}"
        used.add(name)
        kind = overrides.pop(name, None) or overrides.pop(original, None)
        if kind is None:
            kind = "CT" if original.strip().upper() == "CT" else "MR"
        elif str(kind).upper() not in MODALITY_TYPES:
            raise DatasetError(f"modality_types gives {original!r} the type {kind!r}; use one of "
                               f"{', '.join(MODALITY_TYPES)}")
        out[str(int(key))] = (name, str(kind).upper())
    if overrides:
        raise DatasetError(f"modality_types names {', '.join(map(repr, overrides))}, which are not channels of this "
                           f"dataset (channels: {', '.join(repr(str(v)) for v in raw.values())})")
    return out


def _suffix(path: Path) -> str:
    return next((e for e in _FILE_ENDINGS if path.name.lower().endswith(e)), "".join(path.suffixes[-1:]))


def _stem(path: Path) -> str:
    return path.name[: len(path.name) - len(_suffix(path))]


def _raise_if(errors: list[str], src: Path) -> None:
    if errors:
        shown = errors[:_MAX_LISTED] + ([f"... and {len(errors) - _MAX_LISTED} more"] if len(errors) > _MAX_LISTED
                                         else [])
        raise DatasetError(f"cannot import {src}: " + "; ".join(shown))


def _write(plan: _Plan, name: str, labels: dict[str, int], modalities: dict[str, str], src: Path,
           dst: Path) -> DatasetSpec:
    """Validates the new spec, writes the files, then dataset.json (last: it marks a finished import)."""
    root = dst.resolve()
    spec = DatasetSpec(name=name, labels=labels, modalities=modalities, cases=plan.cases, root=root)
    try:
        parse_spec(spec.to_json(), root)  # the spec's own rules (ids, background 0, ...), before any write
    except DatasetError as e:
        raise DatasetError(f"cannot import {src}: {e}") from None
    if not plan.cases:
        raise DatasetError(f"cannot import {src}: no cases found")
    errors: list[str] = []
    for source, _ in plan.copies:  # copied as they are: each must pass the image gate first
        if source not in plan.checked:
            _header(source, errors)
    _raise_if(errors, src)
    for source, target in plan.copies:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    for source, targets in plan.splits:
        _split(source, targets)
    spec.save(root)
    return load_spec(root)
