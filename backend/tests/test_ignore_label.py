"""A structure named "ignore" (nnU-Net v2's convention; MM-WHS marks such voxels 5) is no class: its voxels give no
loss and no gradient, are left out of every Dice, and are never predicted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from monai.losses import DiceCELoss

from crossmodalseg.data.spec import IGNORE_INDEX, DatasetError, load_spec
from crossmodalseg.data.transforms import values_to_indices
from crossmodalseg.engine.evaluate import evaluate_model, format_table, score
from crossmodalseg.engine.inferer import dice_between
from crossmodalseg.engine.trainer import TrainConfig, train
from crossmodalseg.losses.supervision import DeepSupervisionLoss, SegLoss

from .conftest import shared_data, write_image

CLI = [sys.executable, "-m", "crossmodalseg.cli"]
LABELS = {"background": 0, "myocardium": 1, "ignore": 5}


def write_spec(root: Path, labels: dict, cases: list[dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps({"name": root.name, "labels": labels, "modalities": {"ct": "CT"},
                                                   "cases": cases}))
    return root


def test_an_ignore_structure_is_no_class_and_its_voxels_map_to_the_ignore_index(tmp_path: Path):
    spec = load_spec(write_spec(tmp_path / "d", LABELS, []))
    assert spec.structures == ["myocardium"] and spec.num_classes == 2 and spec.label_values == [0, 1]
    assert spec.ignore_value == 5
    label = np.array([[[0, 1, 5, 1]]], np.float64)
    assert values_to_indices(label, spec.label_values, ignore_value=spec.ignore_value).tolist() == [[[0, 1, -1, 1]]]
    with pytest.raises(Exception, match=r"label values \[5\] are not in the dataset spec.*\"ignore\""):
        values_to_indices(label, spec.label_values)  # a dataset that does not name 5 "ignore"
    with pytest.raises(DatasetError, match="'ignore' cannot be the background value 0"):
        load_spec(write_spec(tmp_path / "bad", {"background": 0, "ignore": 0}, []))
    with pytest.raises(DatasetError, match="name 2 'ignore' structures"):
        load_spec(write_spec(tmp_path / "two", {"background": 0, "ignore": 5, "Ignore": 6}, []))
    assert load_spec(write_spec(tmp_path / "case", {"background": 0, "liver": 1, "Ignore": 7}, [])).ignore_value == 7


def test_ignored_voxels_change_neither_the_loss_nor_its_gradient():
    """The loss is MONAI's DiceCE where nothing is ignored; with a block of ignored voxels appended (any logits
    there) it keeps DiceCE's value on the rest, and no gradient reaches those logits."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, 8, generator=g)
    target = torch.randint(0, 3, (2, 1, 8, 8, 8), generator=g)
    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, smooth_nr=1e-5, smooth_dr=1e-5,
                         batch=True)
    reference = dice_ce(logits, target)
    # with nothing ignored it is DiceCE itself, value and gradient
    plain, ours = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    dice_ce(plain, target).backward()
    SegLoss()(ours, target).backward()
    assert torch.allclose(ours.grad, plain.grad, atol=1e-7)
    junk = torch.randn(2, 3, 8, 8, 4, generator=g) * 10
    padded = torch.cat([logits, junk], dim=-1).requires_grad_(True)
    padded_target = torch.cat([target, torch.full((2, 1, 8, 8, 4), IGNORE_INDEX)], dim=-1)
    loss = SegLoss()(padded, padded_target)
    assert torch.allclose(loss, reference, atol=1e-5), (float(loss), float(reference))
    loss.backward()
    assert padded.grad[..., 8:].abs().max() == 0
    assert padded.grad[..., :8].abs().max() > 0
    # deep supervision: the ignore index survives the label's nearest-neighbour downsampling
    coarse = torch.randn(2, 3, 4, 4, 6, generator=g, requires_grad=True)
    DeepSupervisionLoss()([padded.detach(), coarse], padded_target).backward()
    assert coarse.grad[..., 4:].abs().max() == 0 and coarse.grad[..., :4].abs().max() > 0
    everything_ignored = SegLoss()(padded, torch.full_like(padded_target, IGNORE_INDEX))
    assert float(everything_ignored.detach()) == 0.0


def test_scores_leave_ignored_voxels_out():
    reference = np.zeros((6, 6, 6), np.int64)
    reference[1:3, 1:5, 1:5] = 1
    reference[3:5, 1:5, 1:5] = IGNORE_INDEX  # e.g. a slab where the annotator could not tell
    prediction = np.zeros_like(reference)
    prediction[1:5, 1:5, 1:5] = 1  # right where labelled, "wrong" only where nobody knows
    assert score(prediction, reference, ["myocardium"], (1, 1, 1))["myocardium"]["dice"] == 1.0
    assert dice_between(prediction, reference, ["myocardium"]) == {"myocardium": 1.0}
    prediction[1, 1, 1] = 0  # a real miss still counts
    assert dice_between(prediction, reference, ["myocardium"])["myocardium"] == pytest.approx(62 / 63)


def test_a_model_learns_a_structure_from_labels_that_mark_half_its_voxels_ignore(tmp_path: Path):
    """Training labels mark the lower half (in z) of every bright box "ignore". Learnt as background, those voxels
    would teach that half a box is not box; left out, the model segments whole boxes on held-out cases."""
    rng = np.random.default_rng(0)
    cases = []
    for i in range(8):
        image = rng.normal(0, 20, (24, 32, 32)).astype(np.float32)
        label = np.zeros(image.shape, np.uint8)
        z, y, x = rng.integers(2, 10), rng.integers(2, 16), rng.integers(2, 16)
        image[z:z + 12, y:y + 14, x:x + 14] += 200
        label[z:z + 12, y:y + 14, x:x + 14] = 1
        if i < 6:  # training cases: the box's lower half unlabelled
            label[z:z + 6, y:y + 14, x:x + 14] = 5
        write_image(tmp_path / f"c{i}.nii.gz", image, spacing=(2.0, 2.0, 2.0))
        write_image(tmp_path / f"c{i}_label.nii.gz", label, spacing=(2.0, 2.0, 2.0))
        cases.append({"id": f"c{i}", "images": {"ct": f"../c{i}.nii.gz"}, "labels": {"ct": f"../c{i}_label.nii.gz"}})
    training = write_spec(tmp_path / "train", LABELS, cases[:6])
    held_out = write_spec(tmp_path / "test", LABELS, cases[6:])
    config = TrainConfig(method="single", target="ct", epochs=6, iterations_per_epoch=20, device="cpu", val_every=6)
    model = train(training, tmp_path / "model", config)
    results = evaluate_model(model, held_out, device="cpu")
    print(format_table(results))
    assert results["mean"]["myocardium"]["dice"] >= 0.9, format_table(results)
    # The ignore value belongs to a dataset's files: the same model scores a dataset that names none alike.
    plain = write_spec(tmp_path / "plain", {"background": 0, "myocardium": 1}, cases[6:])
    assert evaluate_model(model, plain, device="cpu")["mean"] == results["mean"]
    with pytest.raises(DatasetError, match="differ from the model's"):
        evaluate_model(model, write_spec(tmp_path / "other", {"background": 0, "liver": 1}, cases[6:]), device="cpu")


def test_mmwhs_slices_with_their_ignore_label_check_train_and_predict(tmp_path: Path):
    """The real MM-WHS CT slices (labels 1-4 and 5 = ignore) through the CLI: the dataset checks clean, trains, and
    the prediction holds no 5 and sits on the input's grid."""
    folder = shared_data("mmwhs_sifa_2d_slices")
    labels = {"background": 0, "myocardium": 1, "left_atrium": 2, "left_ventricle_blood": 3, "aorta": 4, "ignore": 5}
    cases = [{"id": s, "images": {"ct": str(folder / f"{s}_ct_image.nii.gz")},
              "labels": {"ct": str(folder / f"{s}_ct_label.nii.gz")}} for s in ("training", "validation")]
    root = write_spec(tmp_path / "mmwhs", labels, cases)
    check = subprocess.run([*CLI, "dataset", "check", str(root)], capture_output=True, text=True, timeout=120)
    assert check.returncode == 0 and "no problems found" in check.stdout, check.stdout + check.stderr
    assert "ignore=5: voxels of unknown class, left out of training and scoring" in check.stdout
    run = subprocess.run([*CLI, "train", str(root), "--target", "ct", "--out", str(tmp_path / "model"), "--epochs", "2",
                          "--iterations-per-epoch", "3", "--device", "cpu"], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    meta = json.loads((tmp_path / "model" / "model.json").read_text())
    assert meta["task"]["labels"]["ignore"] == 5
    image = folder / "validation_ct_image.nii.gz"
    run = subprocess.run([*CLI, "predict", str(tmp_path / "model"), "--image", f"ct={image}", "--out",
                          str(tmp_path / "pred"), "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    predicted = sitk.ReadImage(str(tmp_path / "pred" / "segmentation.nii.gz"))
    source = sitk.ReadImage(str(image))
    assert predicted.GetSize() == source.GetSize() and predicted.GetSpacing() == source.GetSpacing()
    assert set(np.unique(sitk.GetArrayFromImage(predicted)).tolist()) <= {0, 1, 2, 3, 4}


@pytest.mark.parametrize("method,assistants", [("single", []), ("mkd", ["mr"]), ("maml", ["mr"]), ("cmc", ["mr"])])
def test_every_method_trains_on_labels_with_an_ignore_structure(tmp_path: Path, method: str, assistants: list[str]):
    """The phantom with its spleen relabelled "ignore" (value 9): each method trains with finite losses, holds two
    classes besides background, and never predicts the ignore value."""
    from crossmodalseg.data.phantom import make_phantom_dataset
    from crossmodalseg.engine.events import read_events
    from crossmodalseg.engine.inferer import Predictor

    spec = make_phantom_dataset(tmp_path / "phantom", n_cases=3, seed=1, size=(24, 24, 16), spacing=(8.0, 8.0, 10.0))
    for case in spec.cases:
        for path in case.labels.values():
            label = sitk.ReadImage(str(path))
            array = sitk.GetArrayFromImage(label)
            assert (array == 3).any()
            array[array == 3] = 9
            relabelled = sitk.GetImageFromArray(array)
            relabelled.CopyInformation(label)
            sitk.WriteImage(relabelled, str(path))
    raw = json.loads((spec.root / "dataset.json").read_text())
    raw["labels"] = {"background": 0, "liver": 1, "kidney": 2, "ignore": 9}
    (spec.root / "dataset.json").write_text(json.dumps(raw))
    config = TrainConfig(method=method, target="ct", assistants=assistants, epochs=2, iterations_per_epoch=2,
                         device="cpu", val_every=2, options={"iam": "histogram"} if method == "mkd" else {})
    model = train(spec.root, tmp_path / "model", config)
    epochs = [e for e in read_events(model / "events.jsonl") if e["event"] == "epoch"]
    assert epochs and all(np.isfinite(e["loss"]) for e in epochs), epochs
    predictor = Predictor(model, device="cpu")
    assert predictor.task.structures == ["liver", "kidney"]
    case = spec.cases[0]
    result = predictor.predict({m: case.images[m] for m in ["ct", *assistants]}, members=True)
    for label in [result.label, *result.members.values()]:
        assert set(np.unique(sitk.GetArrayFromImage(label)).tolist()) <= {0, 1, 2}
