"""The demo (the README's main job), on a short budget: unpaired phantom CT + MR, the CT-only baseline and MKD
trained on the same labelled CT cases, both scored on the same held-out CT cases, with members and pictures."""

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
                          "--device", "cpu"], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    train_cases = json.loads((out / "data" / "train" / "dataset.json").read_text())["cases"]
    ids = [c["id"] for c in train_cases]
    assert "case006" not in ids and "case008" not in ids and len(ids) == 8
    assert all(len(c["images"]) == 1 for c in train_cases)  # unpaired: one modality per patient
    for name in ("baseline", "mkd"):
        metrics = json.loads((out / name / "metrics.json").read_text())
        print(name, {k: round(v["dice"], 3) for k, v in metrics["mean"].items()})
        assert set(metrics["cases"]) == {"case006", "case008"}  # the held-out CT cases, never trained on
        assert set(metrics["mean"]) == {"liver", "kidney", "spleen"}
        assert metrics["mean"]["liver"]["dice"] > 0.3, (name, metrics["mean"])  # found in 24 s (baseline), 72 s (MKD)
        assert (out / name / "model" / "model.json").exists()
    assert set(summary["members"]) == {"seg_target", "seg_assistant"}  # each MKD member scored on its own
    assert summary["minutes"] == {"baseline": 0.4, "mkd": pytest.approx(1.2)}  # MKD: 3x, for its two networks
    report = (out / "metrics.md").read_text()
    assert "`mkd` ensemble" in report and "`single`, CT only" in report and "member seg_assistant" in report
    # 0.4 minutes make far fewer iterations than find every organ: the report says how long to train instead
    fewest = min(summary["iterations"].values())
    assert fewest < 200 and f"made only {fewest} iterations" in report, report
    advised = float(report.split("run it with `--minutes ")[1].split("`")[0])
    assert advised >= 0.4 * 200 / fewest, (advised, fewest)
    assert len(summary["overlays"]) == 2
    for png in summary["overlays"]:
        with Image.open(png) as image:
            assert image.size[0] > 900 and image.size[1] > 200  # image, reference, baseline, ensemble, disagreement
    # Run again into the same folder (the README's demo command, twice): the earlier output is replaced. It used to
    # end with "already holds a model", after rebuilding the data.
    stale = out / "predictions" / "stale.txt"
    stale.write_text("from the first run")
    again = subprocess.run([sys.executable, "-m", "crossmodalseg.cli", "demo", "--out", str(out), "--minutes", "0.05",
                            "--device", "cpu"], capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "replacing the earlier demo's output" in again.stdout + again.stderr
    assert json.loads((out / "summary.json").read_text())["minutes"]["baseline"] == 0.05
    assert not stale.exists() and (out / "mkd" / "model" / "model.json").exists()
    for name in ("mkd/case006/segmentation.nii.gz", "mkd/case006/segmentation_disagreement.nii.gz",
                 "mkd/case006/segmentation_member_seg_target.nii.gz",
                 "mkd/case006/segmentation_member_seg_assistant.nii.gz", "baseline/case006/segmentation.nii.gz"):
        assert (out / "predictions" / name).exists(), name
