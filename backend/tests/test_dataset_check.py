"""check_dataset: each fault, alone, is reported with a useful message; a clean dataset has none; all at once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from crossmodalseg.data import check, io
from crossmodalseg.data.check import (
    Problem,
    check_dataset,
    dataset_warnings,
    format_report,
)
from crossmodalseg.data.io import Geometry

SIZE_ZYX = (8, 16, 16)  # a 16x16x8 (x, y, z) volume
SPACING = (1.5, 1.5, 3.0)
ORIGIN = (10.0, -20.0, 5.0)
DIRECTION = (0.0, -1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0)  # a 90 degree rotation: catches axis mix-ups


def make_image(array: np.ndarray, spacing=SPACING, origin=ORIGIN, direction=DIRECTION) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    if image.GetDimension() == 3 and image.GetNumberOfComponentsPerPixel() == 1:
        image.SetSpacing(spacing)
        image.SetOrigin(origin)
        image.SetDirection(direction)
    return image


def intensity(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 100, SIZE_ZYX).astype(np.float32)


def segmentation(values=(0, 1, 2), dtype=np.uint8) -> np.ndarray:
    label = np.zeros(SIZE_ZYX, dtype)
    for i, v in enumerate(values[1:]):
        label[2:6, 2 + 5 * i:6 + 5 * i, 3:12] = v
    return label


def write(path: Path, image: sitk.Image) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))
    return path.name if path.parent.name == "" else f"{path.parent.name}/{path.name}"


def build(root: Path, n_cases: int = 2, modalities=None, labels=None) -> dict:
    """A clean dataset: case000 labelled on ct and mr, the other cases with an unlabelled mr image."""
    modalities = modalities or {"ct": "CT", "mr": "MR"}
    cases = []
    for i in range(n_cases):
        cid = f"case{i:03d}"
        case = {"id": cid, "images": {"mr": write(root / cid / "mr.nii.gz", make_image(intensity(i)))}}
        if i == 0:
            case["images"]["ct"] = write(root / cid / "ct.nii.gz", make_image(intensity(10 + i)))
            case["labels"] = {m: write(root / cid / f"{m}_label.nii.gz", make_image(segmentation()))
                              for m in ("ct", "mr")}
        cases.append(case)
    data = {"name": "toy", "labels": labels or {"background": 0, "liver": 1, "spleen": 2},
            "modalities": modalities, "cases": cases}
    save(root, data)
    return data


def save(root: Path, data: dict) -> None:
    (root / "dataset.json").write_text(json.dumps(data))


def only_problem(root: Path) -> Problem:
    _, problems = check_dataset(root)
    assert len(problems) == 1, [str(p) for p in problems]
    return problems[0]


# ---- clean ---------------------------------------------------------------------------------------------------------
def test_clean_dataset_has_no_problems(tmp_path):
    build(tmp_path, n_cases=3)
    spec, problems = check_dataset(tmp_path)
    assert problems == []
    assert spec is not None and len(spec.cases) == 3
    report = format_report(spec, problems)
    assert "no problems found" in report and "'toy'" in report and "3 case(s)" in report
    assert "ct (CT): 1 labelled, 0 unlabelled" in report
    assert "mr (MR): 1 labelled, 2 unlabelled" in report


def test_accepts_the_dataset_json_path_and_non_contiguous_label_values(tmp_path):
    data = build(tmp_path, labels={"background": 0, "myo": 205, "lv": 420})
    write(tmp_path / "case000" / "ct_label.nii.gz", make_image(segmentation((0, 205, 420), np.int16)))
    write(tmp_path / "case000" / "mr_label.nii.gz", make_image(segmentation((0, 420), np.float32)))
    save(tmp_path, data)
    assert check_dataset(tmp_path / "dataset.json")[1] == []


# ---- dataset.json ------------------------------------------------------------------------------------------------
def test_missing_dataset_json_is_one_problem(tmp_path):
    spec, problems = check_dataset(tmp_path)
    assert spec is None and len(problems) == 1
    assert problems[0].case is None and "no dataset.json" in problems[0].message


def test_malformed_dataset_json_is_one_problem_not_an_exception(tmp_path):
    (tmp_path / "dataset.json").write_text("{not json")
    spec, problems = check_dataset(tmp_path)
    assert spec is None and len(problems) == 1 and "not valid JSON" in problems[0].message
    save(tmp_path, {"name": "x", "labels": {"liver": 1}, "modalities": {"ct": "CT"}, "cases": []})
    spec, problems = check_dataset(tmp_path)
    assert spec is None and "background value 0" in problems[0].message
    assert "could not be loaded" in format_report(spec, problems)


def test_empty_dataset(tmp_path):
    save(tmp_path, {"name": "x", "labels": {"background": 0}, "modalities": {"ct": "CT"}, "cases": []})
    problem = only_problem(tmp_path)
    assert problem.case is None and "no cases" in problem.message


def test_no_labelled_case_is_nothing_to_train_on(tmp_path):
    data = build(tmp_path)
    del data["cases"][0]["labels"]
    save(tmp_path, data)
    assert "nothing to train on" in only_problem(tmp_path).message


# ---- files ---------------------------------------------------------------------------------------------------------
def test_missing_image_file(tmp_path):
    build(tmp_path)
    (tmp_path / "case001" / "mr.nii.gz").unlink()
    problem = only_problem(tmp_path)
    assert (problem.case, problem.modality) == ("case001", "mr")
    assert problem.message == "image file not found: case001/mr.nii.gz"


def test_a_file_name_too_long_for_the_file_system_is_one_problem(tmp_path):
    """Path.exists() raises for such a name (found by mutating dataset.json): the check raised instead of listing it
    with the dataset's other problems."""
    data = build(tmp_path)
    data["cases"][1]["images"]["mr"] = "a" * 5000
    save(tmp_path, data)
    problem = only_problem(tmp_path)
    assert (problem.case, problem.modality) == ("case001", "mr")
    assert problem.message.startswith("image ") and problem.message.endswith(": cannot be read (File name too long)")


def test_missing_label_file(tmp_path):
    build(tmp_path)
    (tmp_path / "case000" / "ct_label.nii.gz").unlink()
    problem = only_problem(tmp_path)
    assert (problem.case, problem.modality) == ("case000", "ct")
    assert "label file not found" in problem.message and "ct_label.nii.gz" in problem.message


def test_corrupt_file(tmp_path):
    build(tmp_path)
    (tmp_path / "case001" / "mr.nii.gz").write_bytes(b"\x1f\x8b this is not a volume")
    problem = only_problem(tmp_path)
    assert problem.case == "case001" and "case001/mr.nii.gz" in problem.message
    assert "not a readable image" in problem.message


def test_2d_image(tmp_path):
    build(tmp_path)
    write(tmp_path / "case001" / "mr.nii.gz", sitk.GetImageFromArray(intensity()[0]))
    problem = only_problem(tmp_path)
    assert problem.case == "case001" and "2D" in problem.message


def test_4d_image(tmp_path):
    build(tmp_path)
    four_d = sitk.JoinSeries([make_image(intensity()), make_image(intensity(1))])
    write(tmp_path / "case001" / "mr.nii.gz", four_d)
    problem = only_problem(tmp_path)
    assert problem.case == "case001" and "4D" in problem.message


def test_label_geometry_differs_from_its_image(tmp_path):
    build(tmp_path)
    moved = make_image(segmentation(), spacing=(1.0, 1.0, 2.0))
    write(tmp_path / "case000" / "mr_label.nii.gz", moved)
    problem = only_problem(tmp_path)
    assert (problem.case, problem.modality) == ("case000", "mr")
    assert "geometry differs" in problem.message
    assert Geometry.of(moved).describe() in problem.message
    assert Geometry.of(make_image(intensity())).describe() in problem.message


def test_label_direction_differs_from_its_image(tmp_path):
    build(tmp_path)
    write(tmp_path / "case000" / "ct_label.nii.gz", make_image(segmentation(), direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)))
    problem = only_problem(tmp_path)
    assert problem.modality == "ct" and "directions differ" in problem.message


def test_label_values_not_in_the_spec(tmp_path):
    build(tmp_path, n_cases=4)
    data = json.loads((tmp_path / "dataset.json").read_text())
    data["cases"][3]["images"]["ct"] = write(tmp_path / "case003" / "ct.nii.gz", make_image(intensity()))
    data["cases"][3]["labels"] = {"ct": write(tmp_path / "case003" / "ct_label.nii.gz",
                                              make_image(segmentation((0, 1, 7))))}
    save(tmp_path, data)
    problem = only_problem(tmp_path)
    assert str(problem) == "case003 [ct]: label values {7} are not in the dataset's labels (allowed: 0, 1, 2); map them to the dataset's structures first"


def test_negative_and_many_label_values_are_listed_briefly(tmp_path):
    build(tmp_path)
    label = np.arange(np.prod(SIZE_ZYX), dtype=np.int32).reshape(SIZE_ZYX) - 5  # an image given as a label
    write(tmp_path / "case000" / "ct_label.nii.gz", make_image(label))
    message = only_problem(tmp_path).message
    assert message.startswith("label values {-5, -4, -3, -2, -1, 3, 4, 5, 6, 7, ...")
    assert "(more than 1000 distinct)} are not in the dataset's labels (allowed: 0, 1, 2)" in message


def test_non_integer_label_voxels(tmp_path):
    build(tmp_path)
    label = segmentation().astype(np.float32)
    label[0, 0, :3] = 0.5  # 3 voxels from a linear resampling
    write(tmp_path / "case000" / "mr_label.nii.gz", make_image(label))
    problem = only_problem(tmp_path)
    assert problem.modality == "mr" and "3 non-integer voxel(s)" in problem.message and "0.5" in problem.message


def use_mha(root: Path, data: dict, case: int, image: np.ndarray) -> None:
    """NaN/Inf survive only in .mha/.nrrd: ITK 5's NIfTI reader turns them into 0."""
    data["cases"][case]["images"]["mr"] = write(root / f"case{case:03d}" / "mr.mha", make_image(image))
    save(root, data)


def test_nan_and_inf_image_voxels_are_counted(tmp_path):
    data = build(tmp_path)
    image = intensity()
    image[1, 2, :3] = np.nan
    image[4, 5, :2] = np.inf
    image[7, 0, 0] = -np.inf
    use_mha(tmp_path, data, 1, image)
    problem = only_problem(tmp_path)
    assert problem.case == "case001" and "3 NaN and 3 infinite voxel(s)" in problem.message


def test_slabs_add_up(tmp_path, monkeypatch):
    """Voxels are inspected a few slices at a time; counts and values must cover the whole volume."""
    monkeypatch.setattr(io, "SLAB_VOXELS", 300)  # about one slice per slab
    data = build(tmp_path)
    image = intensity()
    image[:, 0, 0] = np.nan  # one per slice
    use_mha(tmp_path, data, 1, image)
    label = segmentation()
    label[0, 0, 0], label[7, 15, 15] = 9, 8  # first and last slab
    write(tmp_path / "case000" / "ct_label.nii.gz", make_image(label))
    messages = [p.message for p in check_dataset(tmp_path)[1]]
    assert len(messages) == 2
    assert any("8 NaN" in m for m in messages) and any("{8, 9}" in m for m in messages)


def test_each_file_is_read_once(tmp_path, monkeypatch):
    data = build(tmp_path)
    data["cases"][0]["labels"] = {"ct": "case000/ct_label.nii.gz", "mr": "case000/ct_label.nii.gz"}  # shared
    save(tmp_path, data)
    reads: list[Path] = []
    original = check.read_image
    monkeypatch.setattr(check, "read_image", lambda p: reads.append(p) or original(p))
    assert check_dataset(tmp_path)[1] == []
    assert len(reads) == len(set(reads)) == 4  # 3 images + 1 label


# ---- warnings ------------------------------------------------------------------------------------------------------
def test_unused_modality_is_a_warning_not_a_problem(tmp_path):
    build(tmp_path, modalities={"ct": "CT", "mr": "MR", "pet": "MR"})
    spec, problems = check_dataset(tmp_path)
    assert problems == []
    warnings = dataset_warnings(spec)
    assert len(warnings) == 1 and warnings[0].modality == "pet" and "no case" in warnings[0].message
    report = format_report(spec, problems)
    assert "no problems found" in report and "warning: [pet]: modality 'pet'" in report


# ---- everything at once ----------------------------------------------------------------------------------------------
def test_all_problems_are_reported_at_once(tmp_path):
    data = build(tmp_path, n_cases=5)
    (tmp_path / "case001" / "mr.nii.gz").unlink()  # missing
    (tmp_path / "case002" / "mr.nii.gz").write_bytes(b"garbage")  # corrupt
    image = intensity()
    image[0, 0, 0] = np.nan
    use_mha(tmp_path, data, 3, image)  # NaN
    write(tmp_path / "case004" / "mr.nii.gz", sitk.GetImageFromArray(intensity()[0]))  # 2D
    write(tmp_path / "case000" / "ct_label.nii.gz", make_image(segmentation((0, 1, 5))))  # bad value
    write(tmp_path / "case000" / "mr_label.nii.gz", make_image(segmentation(), origin=(0, 0, 0)))  # geometry
    save(tmp_path, data)
    spec, problems = check_dataset(tmp_path)
    found = {(p.case, p.modality, key) for p in problems
             for key in ("not found", "not a readable", "NaN", "2D", "{5}", "geometry differs") if key in p.message}
    assert found == {("case001", "mr", "not found"), ("case002", "mr", "not a readable"), ("case003", "mr", "NaN"),
                     ("case004", "mr", "2D"), ("case000", "ct", "{5}"), ("case000", "mr", "geometry differs")}
    assert len(problems) == 6
    report = format_report(spec, problems)
    assert "6 problem(s):" in report and all(str(p) in report for p in problems)


@pytest.mark.parametrize("case, modality, text", [
    ("c1", "ct", "c1 [ct]: m"), ("c1", None, "c1: m"), (None, "ct", "[ct]: m"), (None, None, "m")])
def test_problem_str(case, modality, text):
    assert str(Problem(case, modality, "m")) == text
