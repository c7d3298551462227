"""The GPU path, for real: every method trains on a CUDA GPU (bf16 autocast, loader worker processes, pinned memory)
and reaches the same Dice bar as on the CPU; GPU prediction agrees with CPU prediction; loader workers on the GPU
draw distinct batches; a resumed GPU run follows the uninterrupted learning-rate curve; a real CUDA out-of-memory
error ends a run with the one-line advice. Skipped where PyTorch sees no GPU (CI has none): run them on a GPU
machine, as backend/benchmarks/gpu_check.sh does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from crossmodalseg.data.io import Geometry, read_image, to_array
from crossmodalseg.data.loaders import patch_stream
from crossmodalseg.data.phantom import make_phantom_dataset
from crossmodalseg.data.plan import make_plan
from crossmodalseg.data.transforms import LoadCased, labelled_patch_transform, patch_ready
from crossmodalseg.engine.evaluate import evaluate_model, format_table
from crossmodalseg.engine.events import read_events
from crossmodalseg.engine.inferer import Predictor
from crossmodalseg.engine.trainer import TrainConfig, train

from .learning import FINE_SIZE, FINE_SPACING, mean_dice, split
from .test_training_engine import CrashAfterEpoch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (PyTorch sees none)")

EPOCHS, ITERATIONS = 12, 25  # the CPU learning tests' budget when measured (300 iterations): the same bar on GPU


@pytest.fixture(scope="module")
def paired(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    spec = make_phantom_dataset(root / "all", n_cases=10, seed=3, size=FINE_SIZE, spacing=FINE_SPACING)
    return split(spec, root, ["case008", "case009"])


METHODS = [("single", [], {}), ("mkd", ["mr"], {"iam": "histogram"}), ("maml", ["mr"], {}),
           ("cmc", ["mr"], {})]


@pytest.mark.parametrize("method,assistants,options", METHODS, ids=[m[0] for m in METHODS])
def test_every_method_learns_on_the_gpu(paired, tmp_path: Path, method: str, assistants: list[str], options: dict):
    dataset, test = paired
    config = TrainConfig(method=method, target="ct", assistants=assistants, epochs=EPOCHS,
                         iterations_per_epoch=ITERATIONS, device="cuda", val_every=EPOCHS, options=options)
    model = train(dataset, tmp_path / method, config)
    start = next(e for e in read_events(model / "events.jsonl") if e["event"] == "start")
    assert start["device"].startswith("cuda"), start
    results = evaluate_model(model, test, device="cuda")
    assert mean_dice(results) >= 0.75, format_table(results)


def test_gpu_prediction_agrees_with_the_cpu(paired, tmp_path: Path):
    dataset, test = paired
    model = train(dataset, tmp_path / "single", TrainConfig(target="ct", epochs=EPOCHS, iterations_per_epoch=ITERATIONS,
                                                            device="cuda", val_every=EPOCHS))
    case = test.cases[0]
    gpu = Predictor(model, device="cuda").predict({"ct": case.images["ct"]}, members=True, uncertainty=True)
    cpu = Predictor(model, device="cpu", precision="float32").predict({"ct": case.images["ct"]})
    assert gpu.info["precision"] == "bfloat16" and gpu.info["device"].startswith("cuda")
    source = Geometry.of(read_image(case.images["ct"]))
    assert Geometry.of(gpu.label) == source
    a, b = to_array(gpu.label, np.int64), to_array(cpu.label, np.int64)
    assert (a == b).mean() >= 0.995, (a != b).sum()  # bf16 on the GPU moves only boundary voxels


def test_gpu_loader_workers_draw_distinct_pinned_batches(paired):
    dataset, _ = paired
    from crossmodalseg.data.spec import load_spec

    spec = load_spec(dataset)
    plan = make_plan(spec, ["ct"], "fast")
    plan.augment = True
    item = patch_ready(LoadCased(["ct"], plan, spec)({"case": spec.cases[0]}), plan, spec.num_classes)
    transform = labelled_patch_transform(plan, spec.num_classes)
    device = torch.device("cuda", 0)
    gpu = patch_stream([item], transform, seed=5, device=device)  # the GPU default: 4 workers, pinned memory
    batches = [next(gpu)["image"] for _ in range(8)]
    assert all(b.device.type == "cuda" for b in batches)
    assert all(not torch.equal(batches[i], batches[j]) for i in range(8) for j in range(i + 1, 8))
    serial = patch_stream([item], transform, seed=5, device=torch.device("cpu"), num_workers=0)
    for b in batches[:4]:  # the same stream as the CPU's serial one: workers change speed, not draws
        assert torch.equal(b.cpu(), next(serial)["image"])


def test_a_resumed_gpu_run_follows_the_uninterrupted_one(paired, tmp_path: Path):
    dataset, _ = paired
    config = dict(target="ct", epochs=4, iterations_per_epoch=3, device="cuda", val_every=100, seed=3)
    train(dataset, tmp_path / "whole", TrainConfig(**config))
    with pytest.raises(KeyboardInterrupt):
        train(dataset, tmp_path / "cut", TrainConfig(**config), events=CrashAfterEpoch(2))
    train(dataset, tmp_path / "cut", TrainConfig(epochs=4, device="cuda"), resume=True)
    whole = [e for e in read_events(tmp_path / "whole" / "events.jsonl") if e["event"] == "epoch"]
    cut = [e for e in read_events(tmp_path / "cut" / "events.jsonl") if e["event"] == "epoch"]
    assert [e["epoch"] for e in cut] == [1, 2, 3, 4]
    loss_keys = [k for k in whole[0] if "loss" in k]
    assert loss_keys, whole[0]
    for a, b in zip(whole, cut):
        assert b["lr_factor"] == pytest.approx(a["lr_factor"], rel=1e-9, abs=1e-12), (a, b)
        for key in loss_keys:  # cuDNN's kernels are not bitwise deterministic: the same batches, close losses
            assert b[key] == pytest.approx(a[key], rel=0.05, abs=0.02), (key, a, b)


def test_a_real_gpu_out_of_memory_ends_the_run_with_advice(paired, tmp_path: Path):
    dataset, _ = paired
    # The process may use 1/100000 of the GPU (about 1.4 MB on an H200): the first convolution runs out of memory.
    code = ("import sys, torch; torch.cuda.set_per_process_memory_fraction(1e-5, 0); "
            "from crossmodalseg.cli import main; sys.exit(main(sys.argv[1:]))")
    run = subprocess.run([sys.executable, "-c", code, "train", str(dataset), "--target", "ct", "--out",
                          str(tmp_path / "oom"), "--epochs", "1", "--iterations-per-epoch", "2", "--device", "cuda"],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-3000:]
    assert "error: the GPU ran out of memory; use --preset fast" in run.stderr, run.stderr[-3000:]
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "oom" / "model.json").exists()
