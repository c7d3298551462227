"""Every bad input gets one clear, actionable message from the CLI (exit code 2, no traceback) and loses nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from crossmodalseg.errors import user_message

from .conftest import write_image

CLI = [sys.executable, "-m", "crossmodalseg.cli"]


def cli(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def assert_clean_error(run: subprocess.CompletedProcess, *fragments: str, code: int = 2) -> None:
    assert run.returncode == code, (run.returncode, run.stdout, run.stderr)
    assert "Traceback" not in run.stderr, run.stderr
    text = run.stdout + run.stderr
    for fragment in fragments:
        assert fragment in text, text


def small_dataset(root: Path, *, label_values=(0, 1), image: np.ndarray | None = None, suffix=".nii.gz") -> Path:
    """Two CT cases of 16x16x8 with a cube labelled 1."""
    root.mkdir(parents=True, exist_ok=True)
    cases = []
    for i in range(2):
        array = image if image is not None else np.random.default_rng(i).normal(0, 50, (8, 16, 16)).astype(np.float32)
        label = np.zeros((8, 16, 16), np.uint8)
        label[2:6, 4:12, 4:12] = label_values[1]
        write_image(root / f"c{i}_ct{suffix}", array, spacing=(2.0, 2.0, 3.0))
        write_image(root / f"c{i}_seg.nii.gz", label, spacing=(2.0, 2.0, 3.0))
        cases.append({"id": f"c{i}", "images": {"ct": f"c{i}_ct{suffix}"}, "labels": {"ct": f"c{i}_seg.nii.gz"}})
    (root / "dataset.json").write_text(json.dumps({"name": "tiny", "labels": {"background": 0, "liver": 1},
                                                   "modalities": {"ct": "CT"}, "cases": cases}))
    return root


def train_args(dataset: Path, out: Path, *extra: str) -> list[str]:
    return ["train", str(dataset), "--target", "ct", "--out", str(out), "--epochs", "1", "--iterations-per-epoch",
            "1", "--device", "cpu", *extra]


def test_dataset_check_lists_problems_and_fails(tmp_path: Path):
    root = small_dataset(tmp_path / "d")
    write_image(root / "c0_seg.nii.gz", np.full((8, 16, 16), 7, np.uint8), spacing=(2.0, 2.0, 3.0))
    (root / "c1_ct.nii.gz").unlink()
    run = cli("dataset", "check", str(root))
    assert_clean_error(run, "label values", "7", "file not found", code=1)
    assert cli("dataset", "check", str(small_dataset(tmp_path / "ok"))).returncode == 0


def test_values_beyond_float32_are_named_as_such_not_as_nan(tmp_path: Path):
    """A float64 image with values near 1e300 is finite, but infinite once cast to float32 for the network: it was
    refused as holding "NaN/Inf voxels", which it does not. Both the check and training say what it holds."""
    array = np.random.default_rng(0).normal(0, 50, (8, 16, 16))
    array[3, 3, 3] = 1e300
    root = small_dataset(tmp_path / "d", image=array, suffix=".mha")
    assert sitk.ReadImage(str(root / "c0_ct.mha")).GetPixelID() == sitk.sitkFloat64
    check = cli("dataset", "check", str(root))
    assert check.returncode == 1 and "beyond float32's range" in check.stdout and "NaN" not in check.stdout, (
        check.stdout)
    run = cli(*train_args(root, tmp_path / "m"))
    assert_clean_error(run, "beyond float32's range")
    assert "NaN" not in run.stderr


def test_train_refuses_label_values_not_in_the_spec(tmp_path: Path):
    root = small_dataset(tmp_path / "d", label_values=(0, 7))
    run = cli(*train_args(root, tmp_path / "m"))
    assert_clean_error(run, "label values", "{7}", "dataset check")
    assert not (tmp_path / "m" / "model.json").exists()


def test_train_refuses_nan_voxels(tmp_path: Path):
    array = np.random.default_rng(0).normal(size=(8, 16, 16)).astype(np.float32)
    array[3, 3, 3] = np.nan
    root = small_dataset(tmp_path / "d", image=array, suffix=".mha")  # NIfTI readers zero NaNs; MHA keeps them
    assert_clean_error(cli(*train_args(root, tmp_path / "m")), "NaN")


def test_train_refuses_geometry_mismatch(tmp_path: Path):
    root = small_dataset(tmp_path / "d")
    write_image(root / "c1_seg.nii.gz", np.zeros((8, 16, 16), np.uint8), spacing=(2.0, 2.0, 3.0),
                origin=(40.0, 0.0, 0.0))
    assert_clean_error(cli(*train_args(root, tmp_path / "m")), "c1", "origin")


def test_train_refuses_2d_and_4d_images(tmp_path: Path):
    root = small_dataset(tmp_path / "d")
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((16, 16), np.float32)), str(root / "c0_ct.nii.gz"))
    four = sitk.JoinSeries([sitk.GetImageFromArray(np.zeros((8, 16, 16), np.float32))] * 2)
    sitk.WriteImage(four, str(root / "c1_ct.nii.gz"))
    assert_clean_error(cli(*train_args(root, tmp_path / "m")), "2D", "4D")


def test_train_refuses_corrupt_files(tmp_path: Path):
    root = small_dataset(tmp_path / "d")
    (root / "c0_ct.nii.gz").write_bytes(b"\x1f\x8b not really a gzip stream")
    assert_clean_error(cli(*train_args(root, tmp_path / "m")), "c0_ct.nii.gz", "not a readable image")


def test_a_truncated_compressed_image_is_refused_not_zero_filled(tmp_path: Path):
    from crossmodalseg.data.io import ImageError, read_image

    path = write_image(tmp_path / "ct.nii.gz", np.random.default_rng(0).normal(size=(20, 30, 40)).astype(np.float32))
    read_image(path)  # the whole file reads
    path.write_bytes(path.read_bytes()[: path.stat().st_size * 2 // 3])  # a copy cut short
    with pytest.raises(ImageError, match="truncated"):
        read_image(path)


def test_train_refuses_empty_and_malformed_datasets(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "dataset.json").write_text(json.dumps({"name": "e", "labels": {"background": 0},
                                                    "modalities": {"ct": "CT"}, "cases": []}))
    assert_clean_error(cli(*train_args(empty, tmp_path / "m")), "no cases")
    assert_clean_error(cli(*train_args(tmp_path / "nowhere", tmp_path / "m")), "no dataset.json")
    (empty / "dataset.json").write_text("{not json")
    assert_clean_error(cli(*train_args(empty, tmp_path / "m")), "not valid JSON")


def test_dataset_json_that_cannot_be_read_or_used_is_one_line_for_check_and_train(tmp_path: Path):
    """Each of these was a traceback (RecursionError, TypeError, IsADirectoryError, UnicodeDecodeError)."""
    good = {"name": "x", "labels": {"background": 0, "liver": 1}, "modalities": {"ct": "CT"}}
    variants = {
        "deep": ("[" * 100000 + "]" * 100000, "nested too deeply"),
        "path_int": (json.dumps({**good, "cases": [{"id": "a", "images": {"ct": 5}}]}), "must be given as paths"),
        "path_null": (json.dumps({**good, "cases": [{"id": "a", "images": {"ct": "a.nii.gz"}, "labels": {"ct": None}}]}),
                      "must be given as paths"),
        "latin1": (b'{"name": "\xe9"}', "not UTF-8"),
        "label_value": (json.dumps({**good, "labels": {"background": 0, "liver": 70000}, "cases": []}),
                        "from 0 to 65535"),
    }
    for name, (text, fragment) in variants.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "dataset.json").write_bytes(text if isinstance(text, bytes) else text.encode())
        check = cli("dataset", "check", str(folder))
        assert check.returncode == 1 and "Traceback" not in check.stderr and fragment in check.stdout, (name, check)
        assert_clean_error(cli(*train_args(folder, tmp_path / f"m_{name}")), fragment)
    (tmp_path / "dir" / "dataset.json").mkdir(parents=True)
    assert_clean_error(cli(*train_args(tmp_path / "dir", tmp_path / "m_dir")), "cannot be read")


def test_serve_and_output_arguments_are_checked_first(tiny_model: Path, tmp_path: Path):
    """A port past 65535, a NaN upload limit, an output folder that is a file: one line, exit code 2 (were
    OverflowError, ValueError, FileExistsError after the whole prediction)."""
    assert_clean_error(cli("serve", "--port", "70000", "--home", str(tmp_path / "h")), "--port 70000")
    assert_clean_error(cli("serve", "--max-upload-mb", "nan", "--home", str(tmp_path / "h")), "--max-upload-mb nan")
    assert_clean_error(cli("serve", "--max-upload-mb", "-1", "--home", str(tmp_path / "h")), "--max-upload-mb -1")
    (tmp_path / "file").write_text("x")
    assert_clean_error(cli("serve", "--port", "0", "--home", str(tmp_path / "file")), "file")
    image = write_image(tmp_path / "x.nii.gz", np.zeros((8, 16, 16), np.float32), spacing=(2.0, 2.0, 3.0))
    assert_clean_error(cli("predict", str(tiny_model), "--image", f"ct={image}", "--out", str(tmp_path / "file")),
                       "is a file")
    assert_clean_error(cli("predict", str(tiny_model), "--image", f"ct={image}", "--image", f"ct={image}", "--out",
                           str(tmp_path / "o")), "ct more than once")  # the last one was used without a word
    assert (tmp_path / "file").read_text() == "x"


def test_python_dash_m_runs_the_command_line():
    run = subprocess.run([sys.executable, "-m", "crossmodalseg", "info"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "mkd" in run.stdout, run.stderr


def test_train_argument_errors(tmp_path: Path):
    root = small_dataset(tmp_path / "d")
    assert_clean_error(cli("train", str(root), "--out", str(tmp_path / "m"), "--device", "cpu"), "--target")
    assert_clean_error(cli(*train_args(root, tmp_path / "m", "--method", "nope")), "unknown method")
    assert_clean_error(cli("train", str(root), "--target", "mr", "--out", str(tmp_path / "m"), "--device", "cpu"),
                       "'mr' is not in dataset")
    assert_clean_error(cli(*train_args(root, tmp_path / "m", "--resume")), "no run to resume")
    for size in ("0", "17", "two"):
        assert_clean_error(cli(*train_args(root, tmp_path / "m", "--batch-size", size)), "batch")
    assert not (tmp_path / "m").exists()


def test_demo_argument_errors(tmp_path: Path):
    """Refused before the demo builds or trains anything."""
    for minutes, fragment in (("-1", "greater than 0"), ("nan", "finite"), ("0", "greater than 0")):
        out = tmp_path / f"demo{minutes}"
        assert_clean_error(cli("demo", "--out", str(out), "--minutes", minutes, "--device", "cpu"), "minutes", fragment)
        assert not out.exists()


def test_the_demo_refuses_a_folder_it_did_not_make_and_changes_nothing(tmp_path: Path):
    """The demo overwrote the dataset it found in OUT/data before refusing the model folder beside it."""
    out = tmp_path / "mine"
    (out / "data").mkdir(parents=True)
    (out / "data" / "dataset.json").write_text('{"name": "my real dataset"}')
    assert_clean_error(cli("demo", "--out", str(out), "--minutes", "0.05", "--device", "cpu"),
                       "not an earlier demo's output")
    assert (out / "data" / "dataset.json").read_text() == '{"name": "my real dataset"}'
    assert sorted(p.name for p in out.rglob("*")) == ["data", "dataset.json"]
    (tmp_path / "file").write_text("x")
    assert_clean_error(cli("demo", "--out", str(tmp_path / "file"), "--device", "cpu"), "is a file")


def test_a_paired_method_on_unpaired_cases_names_the_method_for_them(tmp_path: Path):
    from crossmodalseg.data.phantom import make_phantom_dataset

    spec = make_phantom_dataset(tmp_path / "unpaired", n_cases=4, size=(16, 16, 8), paired=False)
    for method in ("maml", "cmc"):
        run = cli("train", str(spec.root), "--target", "ct", "--assistant", "mr", "--method", method, "--out",
                  str(tmp_path / method), "--device", "cpu", "--epochs", "1")
        if method == "maml":
            assert_clean_error(run, "needs ct, mr with labels in one case", "--method mkd is for")
        else:  # CMC also learns from misaligned pairs and from single labelled images: it trains
            assert run.returncode == 0, run.stderr


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    root = small_dataset(tmp_path_factory.mktemp("tiny") / "d")
    out = tmp_path_factory.mktemp("tiny_model") / "m"
    run = cli(*train_args(root, out))
    assert run.returncode == 0, run.stderr
    return out


def test_train_refuses_to_overwrite_a_model(tiny_model: Path, tmp_path: Path):
    root = small_dataset(tmp_path / "d")
    before = (tiny_model / "unet.safetensors").read_bytes()
    assert_clean_error(cli(*train_args(root, tiny_model)), "already holds a model", "--resume")
    assert (tiny_model / "unet.safetensors").read_bytes() == before


def test_predict_input_errors(tiny_model: Path, tmp_path: Path):
    image = write_image(tmp_path / "x.nii.gz", np.zeros((8, 16, 16), np.float32))
    assert_clean_error(cli("predict", str(tiny_model), "--image", f"mr={image}", "--out", str(tmp_path / "o")),
                       "does not use modality mr")
    assert_clean_error(cli("predict", str(tiny_model), "--image", f"ct={tmp_path / 'missing.nii.gz'}", "--out",
                           str(tmp_path / "o")), "file not found")
    assert_clean_error(cli("predict", str(tmp_path), "--image", f"ct={image}", "--out", str(tmp_path / "o")),
                       "not a model folder")
    assert not (tmp_path / "o").exists()


def test_model_folder_damage_is_reported(tiny_model: Path, tmp_path: Path):
    image = write_image(tmp_path / "x.nii.gz", np.zeros((8, 16, 16), np.float32), spacing=(2.0, 2.0, 3.0))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model, broken)
    (broken / "unet.safetensors").write_bytes(b"garbage")
    assert_clean_error(cli("predict", str(broken), "--image", f"ct={image}", "--out", str(tmp_path / "o")),
                       "not a valid safetensors file")
    (broken / "unet.safetensors").unlink()
    assert_clean_error(cli("predict", str(broken), "--image", f"ct={image}", "--out", str(tmp_path / "o")),
                       "weights file missing")
    # model.json damaged or edited: each was a traceback (AttributeError, KeyError, UnicodeDecodeError,
    # IsADirectoryError, ZeroDivisionError)
    meta = json.loads((tiny_model / "model.json").read_text())
    for name, content, fragment in (
            ("list", b"[2]", "a JSON object is expected"),
            ("no_plan", json.dumps({k: v for k, v in meta.items() if k != "plan"}).encode(), "plan missing"),
            ("spacing0", json.dumps({**meta, "plan": {**meta["plan"], "spacing": [0, 0, 0]}}).encode(),
             "plan.spacing.0: Input should be greater than or equal to 0.0001"),
            ("task_list", json.dumps({**meta, "task": {**meta["task"], "labels": [1]}}).encode(),
             "does not describe a model"),
            ("latin1", b'{"format_version": 2, "x": "\xe9"}', "not UTF-8")):
        damaged = tmp_path / name
        shutil.copytree(tiny_model, damaged)
        (damaged / "model.json").write_bytes(content)
        assert_clean_error(cli("predict", str(damaged), "--image", f"ct={image}", "--out", str(tmp_path / "o")),
                           fragment)


def test_a_model_description_out_of_range_is_refused_before_anything_is_built(tiny_model: Path):
    """model.json comes from anyone (an imported archive, an edited file). Found by mutating a real one: filters of
    1e6 asked for terabytes (an allocation error, a 500 on import), a kernel of 4 failed an assertion inside MONAI, a
    normalisation std of "x" passed the import and made every prediction a 500, a patch that the strides do not
    divide failed inside the network. Each is now refused, naming the field, before a weight is allocated."""
    from crossmodalseg.engine.checkpoint import ModelFolderError
    from crossmodalseg.engine.inferer import build_method

    meta = json.loads((tiny_model / "model.json").read_text())
    assert build_method(meta).task.num_classes == 2  # the real one builds

    def changed(section: str, **fields) -> dict:
        return {**meta, section: {**meta[section], **fields}}

    levels = len(meta["plan"]["strides"])
    normalisation = meta["plan"]["normalisation"]["ct"]
    for damaged, fragment in (
            (changed("plan", filters=[1_000_000] * levels), "plan.filters.0"),
            (changed("plan", kernels=[[4, 4, 4]] * levels), "plan.kernels.0.0"),
            (changed("plan", normalisation={"ct": {**normalisation, "std": "x"}}), "plan.normalisation.ct.std"),
            (changed("plan", normalisation={"ct": {**normalisation, "clip": [100.0, -100.0]}}), "[low, high]"),
            (changed("plan", normalisation={}), "no entry for modality ct"),
            (changed("plan", patch_size=[p + 1 for p in meta["plan"]["patch_size"]]), "not a multiple"),
            (changed("plan", patch_size=[512, 512, 64], strides=[[1, 1, 1]] * levels), "voxels"),
            (changed("plan", convs_per_level=3), "plan.convs_per_level"),
            # within every field's range, but 8 levels of 1024 filters with 5x5x5 kernels: 2e9 parameters
            (changed("plan", filters=[1024] * 8, strides=[[1, 1, 1]] * 8, kernels=[[5, 5, 5]] * 8,
                     patch_size=[8, 8, 8]), "parameters"),
            (changed("task", labels={"background": 0, "x": 1.5}), "label 'x' has value 1.5"),
            (changed("task", labels={"background": 0}), "no structure besides the background"),
            (changed("task", assistants=["ct"]), "'target' and 'assistants'"),
            (changed("method", hparams={"width": 1e9}), "width")):
        with pytest.raises(ModelFolderError, match="does not describe a model") as refused:
            build_method(damaged)
        assert fragment in str(refused.value), (fragment, str(refused.value))


def test_gpu_out_of_memory_becomes_advice():
    message = user_message(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert message is not None and "--preset fast" in message


def test_bugs_are_not_disguised_as_user_errors():
    assert user_message(KeyError("x")) is None


def test_control_characters_in_names_reach_the_terminal_escaped(tmp_path: Path):
    """A dataset.json (or a file name) from elsewhere may hold terminal escapes: printed raw, they could clear the
    screen or disguise the line that explains the problem. Messages show them as Python escapes."""
    root = small_dataset(tmp_path / "d")
    spec = json.loads((root / "dataset.json").read_text())
    spec["cases"][0]["images"]["ct"] = "c0_\x1b[2J\u202ect.nii.gz"  # clear screen; right-to-left override
    (root / "dataset.json").write_text(json.dumps(spec))
    run = cli("dataset", "check", str(root))
    text = run.stdout + run.stderr
    assert run.returncode == 1 and "file not found" in text, text
    assert "\x1b" not in text and "\u202e" not in text, text
    assert "c0_\\x1b[2J\\u202ect.nii.gz" in text, text
    run = cli("train", str(root), "--target", "ct", "--out", str(tmp_path / "m\x1b[2J"), "--epochs", "1",
              "--device", "cpu")
    assert_clean_error(run, "\\x1b[2J")
    assert "\x1b" not in run.stdout + run.stderr


def test_a_prediction_that_cannot_write_all_its_outputs_leaves_the_earlier_ones(tiny_model: Path, tmp_path: Path):
    """The outputs are written all or none: a prediction whose report cannot be written (here a folder holds its name;
    a full disk does the same) replaced the earlier run's label map before it failed, leaving a label map and a
    report of two different runs."""
    image = small_dataset(tmp_path / "d") / "c0_ct.nii.gz"
    out = tmp_path / "o"
    first = cli("predict", str(tiny_model), "--image", f"ct={image}", "--out", str(out))
    assert first.returncode == 0, first.stderr
    earlier = (out / "segmentation.nii.gz").read_bytes()
    (out / "segmentation.json").unlink()
    (out / "segmentation.json").mkdir()
    other = tmp_path / "other.nii.gz"
    write_image(other, np.zeros((8, 16, 16), np.float32), spacing=(1.0, 1.0, 1.0))
    assert_clean_error(cli("predict", str(tiny_model), "--image", f"ct={other}", "--out", str(out)),
                       "segmentation.json is a folder")
    assert (out / "segmentation.nii.gz").read_bytes() == earlier
    assert sorted(p.name for p in out.iterdir()) == ["segmentation.json", "segmentation.nii.gz"]
