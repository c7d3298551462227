"""The dataset spec (`dataset.json`): structures, modalities and cases.

A case maps modality -> image file and modality -> label file (a label lives in the space of its image). Unpaired
data are cases with one modality each; unlabelled cases have no labels. A label is shared with the case's other
modalities only where the case says its images are co-registered (`"co_registered": true`): resampling a label by
world coordinates onto a misaligned or another patient's image would teach wrong anatomy. Label values on disk may be anything
(MM-WHS uses 205, 420, ...): `labels` maps structure names to those values, and training works on contiguous class
indices 0..K in the order of `labels` (background first).
A structure named "ignore" (nnU-Net v2's convention, e.g. MM-WHS's 5) marks voxels whose class is unknown: they carry
no loss, are not scored, and are never predicted (the networks have no output for them).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..files import write_atomic

MODALITY_TYPES = ("CT", "MR")
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")  # \Z, not $: "abc\n" is no id
SPEC_FILE = "dataset.json"


class DatasetError(UserError):
    """A dataset spec that cannot be used; the message says what to fix."""


MAX_LABEL_VALUE = 65535  # label maps are written as unsigned 16-bit: 70000 came back as 4464


@dataclass
class Case:
    id: str
    images: dict[str, Path]
    labels: dict[str, Path] = field(default_factory=dict)
    co_registered: bool = False  # the images show the same anatomy at the same world positions

    @property
    def labelled(self) -> bool:
        return bool(self.labels)

    def label_for(self, modality: str) -> Path | None:
        """The label drawn on `modality`'s image; for co-registered images, else another label of the case (it is
        resampled onto the image's grid by world coordinates)."""
        if modality in self.labels:
            return self.labels[modality]
        if self.co_registered:
            return next(iter(self.labels.values()), None)
        return None

    def unshared_labels(self) -> list[str]:
        """Modalities with an image but no label of their own, in a case where another modality is labelled and
        the images are not declared co-registered: those images count as unlabelled."""
        if self.co_registered or not self.labels:
            return []
        return [m for m in self.images if m not in self.labels]


IGNORE = "ignore"  # the structure name (any letter case) that marks unlabelled voxels


def is_ignore(name: str) -> bool:
    return name.strip().lower() == IGNORE
IGNORE_INDEX = -1  # their class index in label arrays: no loss, no score


class LabelSet:
    """Views of a `labels` mapping (structure name -> on-disk value): class k is the k-th structure, 0 background;
    a structure named "ignore" is no class (see the module docstring)."""

    labels: dict[str, int]

    @property
    def structures(self) -> list[str]:
        """Foreground structure names, in class-index order (index 1 first)."""
        return [name for name in self.labels if self.labels[name] != 0 and not is_ignore(name)]

    @property
    def ignore_value(self) -> int | None:
        """The on-disk value of voxels to leave out of training and scoring, if the labels name one."""
        return next((value for name, value in self.labels.items() if is_ignore(name)), None)

    @property
    def num_classes(self) -> int:
        return len(self.structures) + 1

    @property
    def label_values(self) -> list[int]:
        """On-disk values in class-index order: label_values[k] is written for class k."""
        return [0] + [self.labels[name] for name in self.structures]


@dataclass
class DatasetSpec(LabelSet):
    name: str
    labels: dict[str, int]
    modalities: dict[str, str]
    cases: list[Case]
    root: Path

    def case(self, case_id: str) -> Case:
        for case in self.cases:
            if case.id == case_id:
                return case
        raise DatasetError(f"dataset {self.name!r} has no case {case_id!r}")

    def cases_with(self, modality: str, labelled: bool | None = None) -> list[Case]:
        out = [c for c in self.cases if modality in c.images]
        if labelled is not None:
            out = [c for c in out if (c.label_for(modality) is not None) == labelled]
        return out

    # ---- (de)serialisation ---------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        def rel(p: Path) -> str:
            try:
                return Path(os.path.relpath(p, self.root)).as_posix()
            except ValueError:  # another drive on Windows
                return str(p)

        return {
            "name": self.name,
            "labels": dict(self.labels),
            "modalities": dict(self.modalities),
            "cases": [
                {"id": c.id, "images": {m: rel(p) for m, p in c.images.items()},
                 **({"labels": {m: rel(p) for m, p in c.labels.items()}} if c.labels else {}),
                 **({"co_registered": True} if c.co_registered else {})}
                for c in self.cases
            ],
        }

    def save(self, directory: Path | None = None) -> Path:
        directory = Path(directory or self.root)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / SPEC_FILE
        write_json_atomic(path, self.to_json())
        return path


def spec_path(path: str | Path) -> Path:
    path = Path(path)
    return path / SPEC_FILE if path.is_dir() else path


def label_problems(labels: Any) -> list[str]:
    """What is wrong with a `labels` mapping (structure name -> on-disk value), of a dataset.json or a model.json."""
    if not isinstance(labels, dict) or not labels:
        return ["'labels' must map structure names to integer values, e.g. {\"background\": 0, \"liver\": 1}"]
    problems = []
    for name, value in labels.items():
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_LABEL_VALUE:
            problems.append(f"label {name!r} has value {value!r}; values must be integers from 0 to "
                            f"{MAX_LABEL_VALUE} (label maps are written as 16-bit)")
    values = [v for v in labels.values() if isinstance(v, int)]
    if len(set(values)) != len(values):
        problems.append("two structures share one label value")
    if 0 not in values:
        problems.append("'labels' must name the background value 0")
    ignored = [name for name in labels if is_ignore(str(name))]
    if len(ignored) > 1:
        problems.append(f"'labels' name {len(ignored)} 'ignore' structures ({', '.join(ignored)}); keep one")
    if any(labels[name] == 0 for name in ignored):
        problems.append("'ignore' cannot be the background value 0; give it its own value (e.g. the highest)")
    return problems


def modality_problems(modalities: Any) -> list[str]:
    """What is wrong with a `modalities` mapping (name -> "CT" or "MR"), of a dataset.json or a model.json."""
    if not isinstance(modalities, dict) or not modalities:
        return ["'modalities' must map modality names to a type, e.g. {\"ct\": \"CT\", \"t1c\": \"MR\"}"]
    problems = []
    for name, kind in modalities.items():
        if kind not in MODALITY_TYPES:
            problems.append(f"'modalities' give {name!r} the type {kind!r}; use one of {', '.join(MODALITY_TYPES)}")
        if not ID_PATTERN.match(str(name)):
            problems.append(f"'modalities' name {name!r}: a modality name may hold only letters, digits, '_', '-' "
                            f"and '.'")
    return problems


def parse_spec(data: Any, root: Path) -> DatasetSpec:
    """Builds a spec from parsed JSON, raising DatasetError with every structural problem listed."""
    problems: list[str] = []
    if not isinstance(data, dict):
        raise DatasetError("dataset.json must hold a JSON object with 'name', 'labels', 'modalities' and 'cases'")
    for key in ("name", "labels", "modalities", "cases"):
        if key not in data:
            problems.append(f"missing key {key!r}")
    if problems:
        raise DatasetError("dataset.json: " + "; ".join(problems))

    labels = data["labels"]
    problems += label_problems(labels)
    labels = labels if isinstance(labels, dict) else {}

    modalities = data["modalities"]
    problems += modality_problems(modalities)
    modalities = modalities if isinstance(modalities, dict) else {}

    cases: list[Case] = []
    raw_cases = data["cases"]
    if not isinstance(raw_cases, list):
        problems.append("'cases' must be a list")
        raw_cases = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_cases):
        if not isinstance(raw, dict) or "id" not in raw or "images" not in raw:
            problems.append(f"case #{i} needs 'id' and 'images'")
            continue
        cid = str(raw["id"])
        if not ID_PATTERN.match(cid):
            problems.append(f"case id {cid!r} may hold only letters, digits, '_', '-' and '.'")
        if cid in seen:
            problems.append(f"case id {cid!r} appears twice")
        seen.add(cid)
        images, case_labels = raw.get("images") or {}, raw.get("labels") or {}
        if not isinstance(images, dict) or not images:
            problems.append(f"case {cid!r}: 'images' must map modality -> file")
            continue
        if not isinstance(case_labels, dict):
            problems.append(f"case {cid!r}: 'labels' must map modality -> file")
            case_labels = {}
        for m in list(images) + list(case_labels):
            if m not in modalities:
                problems.append(f"case {cid!r}: modality {m!r} is not declared in 'modalities'")
        for m in case_labels:
            if m not in images:
                problems.append(f"case {cid!r}: a label for {m!r} but no {m!r} image")
        co_registered = raw.get("co_registered", False)
        if not isinstance(co_registered, bool):
            problems.append(f"case {cid!r}: 'co_registered' must be true or false")
            co_registered = False
        not_paths = [m for m, p in [*images.items(), *case_labels.items()] if not isinstance(p, str) or not p]
        if not_paths:
            problems.append(f"case {cid!r}: the files for {', '.join(map(repr, not_paths))} must be given as paths "
                            f"(strings)")
            continue
        cases.append(Case(
            id=cid,
            images={m: _resolve(root, p) for m, p in images.items()},
            labels={m: _resolve(root, p) for m, p in case_labels.items()},
            co_registered=co_registered,
        ))
    if problems:
        raise DatasetError("dataset.json: " + "; ".join(problems))
    return DatasetSpec(name=str(data["name"]), labels=dict(labels), modalities=dict(modalities), cases=cases,
                       root=root)


def _resolve(root: Path, p: str) -> Path:
    path = Path(p)
    return path if path.is_absolute() else root / path


def load_spec(path: str | Path) -> DatasetSpec:
    """Reads `dataset.json` (or the folder holding it)."""
    file = spec_path(path)
    if not file.exists():
        raise DatasetError(f"no dataset.json at {file} (pass the dataset folder or its dataset.json)")
    return parse_spec(read_json_file(file, DatasetError), file.parent.resolve())


def read_json_file(path: Path, error: type[UserError]) -> Any:
    """A JSON file a user gave (dataset.json, model.json): whatever keeps it from being read becomes `error`,
    naming the file: a folder, bytes that are not UTF-8, invalid JSON, nesting too deep to parse."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise error(f"{path} is not UTF-8 text; save it as UTF-8 JSON") from None
    except OSError as e:
        raise error(f"{path} cannot be read ({e.strerror})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path} is not valid JSON: {e}") from None
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply to read") from None


def write_json_atomic(path: Path, data: Any) -> None:
    """Writes JSON so that readers see the old or the new file, never a half-written one."""
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())

    write_atomic(path, write)
