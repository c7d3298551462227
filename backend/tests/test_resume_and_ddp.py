"""A training killed mid-way resumes from its last checkpoint; two CPU processes under torchrun train the same kind
of model folder as one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from crossmodalseg.config import TrainConfig
from crossmodalseg.data.phantom import make_phantom_dataset
from crossmodalseg.engine.checkpoint import latest_checkpoint, read_model_meta
from crossmodalseg.engine.events import read_events
from crossmodalseg.engine.inferer import Predictor

from .learning import FINE_SIZE, FINE_SPACING

CLI = [sys.executable, "-m", "crossmodalseg.cli"]


def test_killed_training_resumes_from_its_checkpoint(phantom_split, tmp_path: Path):
    train_spec, test = phantom_split
    out = tmp_path / "run"
    args = [*CLI, "train", str(train_spec.root), "--target", "ct", "--out", str(out), "--epochs", "4",
            "--iterations-per-epoch", "3", "--val-every", "100", "--checkpoint-every", "1", "--device", "cpu",
            "--json-events"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and latest_checkpoint(out) is None and proc.poll() is None:
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read().decode()
    os.killpg(proc.pid, signal.SIGKILL)  # no chance to clean up: as a power cut or an OOM killer would do
    proc.wait()
    killed_at = json.loads((out / "checkpoint" / "latest.json").read_text())["epoch"]
    assert 1 <= killed_at < 4 and not (out / "model.json").exists()

    run = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr
    events = read_events(out / "events.jsonl")
    resumed = [e for e in events if e["event"] == "resumed"]
    assert resumed and resumed[-1]["epoch"] >= killed_at
    after = [e["epoch"] for e in events[events.index(resumed[-1]):] if e["event"] == "epoch"]
    assert after == list(range(resumed[-1]["epoch"] + 1, 5))  # continues, does not restart
    meta = read_model_meta(out)
    assert meta["training"]["epochs"] == 4
    result = Predictor(out, device="cpu").predict({"ct": test.cases[0].images["ct"]})
    # where the prediction's time went, stage by stage, adding up to its whole time
    assert list(result.info["stage_seconds"]) == ["read", "preprocess", "sliding_windows", "output"]
    assert sum(result.info["stage_seconds"].values()) == pytest.approx(result.info["seconds"], abs=0.01)


# (method, assistants, options); MKD also with kd_t2a_target, whose seg_assistant runs twice with gradient per step
DDP_CASES = [("single", [], []), ("mkd", ["mr"], ["translator_filters=4"]),
             ("mkd", ["mr"], ["kd_t2a_target=1.0"]), ("maml", ["mr"], []), ("cmc", ["mr"], ["warmup=0.5"])]


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory) -> Path:
    """Paired CT + MR phantom cases: three labelled on CT only (so CMC has no labelled assistant image, a case the
    method allows), two unlabelled pairs."""
    root = tmp_path_factory.mktemp("ddp")
    spec = make_phantom_dataset(root / "all", n_cases=5, seed=11, size=FINE_SIZE, spacing=FINE_SPACING)
    for case in spec.cases:
        case.labels = {"ct": case.labels["ct"]} if case.id < "case003" else {}
        case.co_registered = False  # so the CT label does not serve the MR image
    spec.root = root / "data"
    spec.save()
    # MKD learns from labelled images of both modalities: the same cases, with case003's MR labelled.
    mkd_case = next(c for c in spec.cases if c.id == "case003")
    mkd_case.labels = {"mr": root / "all" / "case003" / "mr_label.nii.gz"}
    spec.root = root / "data_mkd"
    spec.save()
    return root / "data"


@pytest.mark.parametrize("method,assistants,options", DDP_CASES, ids=["-".join([c[0], *c[2]]) for c in DDP_CASES])
def test_torchrun_two_cpu_processes_train_every_method(ddp_data: Path, tmp_path: Path, method: str,
                                                       assistants: list[str], options: list[str]):
    data = ddp_data.parent / "data_mkd" if method == "mkd" else ddp_data
    common = ["train", str(data), "--method", method, "--target", "ct",
              *[a for m in assistants for a in ("--assistant", m)], "--epochs", "2", "--iterations-per-epoch", "2",
              "--device", "cpu", "--val-every", "1"]
    common += [a for option in options for a in ("--option", option)]  # CMC's warmup=0.5: both of its phases run
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "crossmodalseg.cli", *common, "--out", str(tmp_path / "ddp")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    meta = read_model_meta(tmp_path / "ddp")
    assert meta["method"]["name"] == method and meta["training"]["world_size"] == 2
    assert meta["training"]["iterations"] == 4
    events = read_events(tmp_path / "ddp" / "events.jsonl")  # only rank 0 writes events
    assert [e["event"] for e in events].count("done") == 1 and [e["event"] for e in events].count("start") == 1
    assert np.isfinite(meta["training"]["val_dice"]["mean"])
    label = Predictor(tmp_path / "ddp", device="cpu").predict({"ct": str(ddp_data.parent / "all" / "case004" / "ct.nii.gz")}).label
    assert label.GetSize() == FINE_SIZE


def test_service_worker_runs_a_ddp_training_job_under_torchrun(ddp_data: Path, tmp_path: Path):
    """The service's multi-process job (on GPUs in the product; here two CPU processes): the worker starts torchrun
    around its `rank` entry, both ranks end cleanly, only rank 0 reports events."""
    config = TrainConfig.parse({"method": "single", "target": "ct", "epochs": 2, "iterations_per_epoch": 2,
                                "val_every": 1, "device": "cpu"})
    job_file = tmp_path / "job.json"
    job_file.write_text(json.dumps({"kind": "train", "dataset": str(ddp_data), "out": str(tmp_path / "model"),
                                    "resume": False, "processes": 2, "config": config.model_dump(mode="json")}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "crossmodalseg.service.worker", str(os.getpid()), str(job_file)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    events = [json.loads(line)["event"] for line in run.stdout.splitlines() if line.startswith("{")]
    assert events.count("start") == 1 and events.count("done") == 1
    assert read_model_meta(tmp_path / "model")["training"]["world_size"] == 2
