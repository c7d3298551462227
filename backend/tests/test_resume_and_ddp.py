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

from crossmodalseg.engine.checkpoint import latest_checkpoint, read_model_meta
from crossmodalseg.engine.events import read_events
from crossmodalseg.engine.inferer import Predictor

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
    Predictor(out, device="cpu").predict({"ct": test.cases[0].images["ct"]})


def test_torchrun_two_cpu_processes_make_the_same_kind_of_model(phantom_split, tmp_path: Path):
    train_spec, test = phantom_split
    common = ["train", str(train_spec.root), "--target", "ct", "--epochs", "1", "--iterations-per-epoch", "2",
              "--device", "cpu", "--val-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "crossmodalseg.cli", *common, "--out", str(tmp_path / "ddp")],
                         capture_output=True, text=True, timeout=600, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = subprocess.run([*CLI, *common, "--out", str(tmp_path / "one")], capture_output=True, text=True,
                         timeout=600, env=env)
    assert one.returncode == 0, one.stderr[-3000:]

    def files(folder: Path) -> list[str]:
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())

    assert files(tmp_path / "ddp") == files(tmp_path / "one")
    ddp_meta, one_meta = read_model_meta(tmp_path / "ddp"), read_model_meta(tmp_path / "one")
    assert ddp_meta.keys() == one_meta.keys()
    assert ddp_meta["method"] == one_meta["method"] and ddp_meta["plan"] == one_meta["plan"]
    assert ddp_meta["training"]["world_size"] == 2 and one_meta["training"]["world_size"] == 1
    # Only rank 0 writes events: one "done", one "start".
    events = read_events(tmp_path / "ddp" / "events.jsonl")
    assert [e["event"] for e in events].count("done") == 1
    label = Predictor(tmp_path / "ddp", device="cpu").predict({"ct": test.cases[0].images["ct"]}).label
    assert label.GetSize() == (48, 48, 32)
    assert np.isfinite(ddp_meta["training"]["val_dice"]["mean"])
