"""The demo (the README's main job), on a short budget: builds the phantom, trains, segments, writes the report."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image


@pytest.mark.slow
def test_demo_writes_a_complete_report(tmp_path: Path):
    out = tmp_path / "demo"
    run = subprocess.run([sys.executable, "-m", "crossmodalseg.cli", "demo", "--out", str(out), "--minutes", "0.4",
                          "--device", "cpu"], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["cases"]) == {"case008", "case009"}  # the held-out cases, never trained on
    assert set(metrics["mean"]) == {"liver", "kidney", "spleen"}
    assert metrics["mean"]["liver"]["dice"] > 0.3  # 24 s of CPU training already finds the liver
    assert (out / "metrics.md").read_text().count("| case00") == 2
    assert len(summary["overlays"]) == 2
    for png in summary["overlays"]:
        with Image.open(png) as image:
            assert image.size[0] > 600 and image.size[1] > 200
    assert (out / "model" / "model.json").exists()
    assert (out / "predictions" / "case008" / "segmentation.nii.gz").exists()
    train_ids = [c["id"] for c in json.loads((out / "data" / "train" / "dataset.json").read_text())["cases"]]
    assert "case008" not in train_ids and len(train_ids) == 8
