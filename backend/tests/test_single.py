"""The `single` baseline end to end on the phantom: it learns, predicts in the input's geometry, evaluates, is
driven by the CLI, and fine-tunes with --init-from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from crossmodalseg.data.io import Geometry, read_image, to_array
from crossmodalseg.engine.checkpoint import read_model_meta
from crossmodalseg.engine.evaluate import evaluate_model, format_table
from crossmodalseg.engine.inferer import Predictor
from crossmodalseg.engine.trainer import TrainConfig, TrainingError, train

CLI = [sys.executable, "-m", "crossmodalseg.cli"]


def test_single_reaches_dice_on_held_out_phantom_cases(trained_single: Path, phantom_split):
    _, test = phantom_split
    results = evaluate_model(trained_single, test, device="cpu")
    print(format_table(results))
    assert set(results["cases"]) == {c.id for c in test.cases}
    for structure in ("liver", "kidney", "spleen"):
        assert results["mean"][structure]["dice"] >= 0.8, format_table(results)
        assert results["mean"][structure]["hd95"] is not None
    assert "| mean |" in format_table(results)


def test_prediction_has_the_input_geometry_exactly(trained_single: Path, phantom_split):
    _, test = phantom_split
    case = test.cases[0]
    source = read_image(case.images["ct"])
    result = Predictor(trained_single, device="cpu").predict({"ct": case.images["ct"]})
    assert Geometry.of(result.label) == Geometry.of(source)
    assert result.label.GetPixelID() == sitk.sitkUInt8
    # Voxel-for-voxel alignment: the label map overlaps the reference drawn on the same grid.
    reference = to_array(read_image(case.labels["ct"]), np.uint8)
    predicted = to_array(result.label, np.uint8)
    assert set(np.unique(predicted)) <= {0, 1, 2, 3}
    liver = 2 * ((predicted == 1) & (reference == 1)).sum() / ((predicted == 1).sum() + (reference == 1).sum())
    assert liver > 0.8


def test_model_folder_is_self_describing_and_safetensors_only(trained_single: Path):
    meta = read_model_meta(trained_single)
    assert meta["method"]["name"] == "single"
    assert meta["task"]["target"] == "ct" and meta["task"]["labels"]["liver"] == 1
    assert meta["plan"]["patch_size"] and meta["plan"]["normalisation"]["ct"]["kind"] == "CT"
    assert meta["training"]["config"]["preset"] == "fast"  # every default is written down
    assert meta["software"]["torch"]
    weights = sorted(p.name for p in trained_single.glob("*.safetensors"))
    assert weights == ["unet.safetensors"]
    assert not list(trained_single.rglob("*.pt")) and not list(trained_single.rglob("*.pkl"))


def test_cli_predict_with_members_and_uncertainty(trained_single: Path, phantom_split, tmp_path: Path):
    _, test = phantom_split
    case = test.cases[1]
    run = subprocess.run([*CLI, "predict", str(trained_single), "--image", f"ct={case.images['ct']}", "--out",
                          str(tmp_path), "--members", "--uncertainty", "--device", "cpu"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    label = read_image(tmp_path / "segmentation.nii.gz")
    member = read_image(tmp_path / "segmentation_member_unet.nii.gz")
    disagreement = read_image(tmp_path / "segmentation_disagreement.nii.gz")
    source = Geometry.of(read_image(case.images["ct"]))
    for image in (label, member, disagreement):
        assert Geometry.of(image) == source
    # One member: the ensemble is that member, and members cannot disagree.
    np.testing.assert_array_equal(to_array(label), to_array(member))
    assert float(to_array(disagreement).max()) < 1e-5


def test_cli_evaluate_prints_a_table_and_writes_json(trained_single: Path, phantom_split, tmp_path: Path):
    _, test = phantom_split
    out = tmp_path / "eval.json"
    run = subprocess.run([*CLI, "evaluate", str(trained_single), str(test.root), "--json", str(out), "--device",
                          "cpu"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "liver Dice" in run.stdout
    data = json.loads(out.read_text())
    assert set(data["cases"]) == {c.id for c in test.cases}


def test_fine_tuning_from_a_model(trained_single: Path, phantom_split, tmp_path: Path):
    train_spec, test = phantom_split
    config = TrainConfig(method="single", target="ct", epochs=1, iterations_per_epoch=4, device="cpu",
                         init_from=str(trained_single))
    tuned = train(train_spec.root, tmp_path / "tuned", config)
    meta = read_model_meta(tuned)
    assert meta["training"]["init_from"] == str(trained_single)
    assert meta["plan"]["spacing"] == read_model_meta(trained_single)["plan"]["spacing"]  # the plan is inherited
    # Starting from trained weights, a few small steps keep the model good (a random start would be near 0).
    results = evaluate_model(tuned, test, device="cpu")
    print(f"fine-tuned: liver Dice {results['mean']['liver']['dice']:.3f}")
    assert results["mean"]["liver"]["dice"] > 0.8


def test_fine_tuning_refuses_an_incompatible_model(trained_single: Path, phantom_split, tmp_path: Path):
    train_spec, _ = phantom_split
    config = TrainConfig(method="single", target="mr", epochs=1, iterations_per_epoch=1, device="cpu",
                         init_from=str(trained_single))
    with pytest.raises(TrainingError, match="modalities"):
        train(train_spec.root, tmp_path / "bad", config)
