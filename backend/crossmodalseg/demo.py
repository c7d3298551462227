"""`crossmodalseg demo`: the main job on an embedded default, fully offline.

Builds the two-modality phantom dataset (CT-like and MR-like images of one synthetic abdomen anatomy with known
liver, kidney and spleen labels), trains a small model on the CT cases, segments held-out cases and writes a report
folder: metrics (JSON and a Markdown table), per-case PNG overlays and the model folder itself.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from .data.io import read_image, to_array
from .data.phantom import make_phantom_dataset
from .data.spec import DatasetSpec, write_json_atomic
from .data.transforms import values_to_indices
from .engine.evaluate import evaluate_model, format_table
from .engine.events import EventLog
from .engine.inferer import Predictor
from .engine.trainer import TrainConfig, train
from .report import save_overlay

DEMO_CASES = 10
DEMO_TEST_CASES = 2
CT_SOFT_TISSUE_WINDOW = (-160.0, 240.0)  # level 40 HU, width 400 HU


def run_demo(out: str | Path, minutes: float = 2.5, device: str = "auto", seed: int = 0,
             events: EventLog | None = None) -> dict[str, Any]:
    out = Path(out)
    started = time.time()
    events = events or EventLog()
    say = lambda msg: events.emit("log", message=msg)  # noqa: E731

    say(f"[demo] building the phantom dataset ({DEMO_CASES} cases, CT + MR) in {out / 'data'}")
    full = make_phantom_dataset(out / "data", n_cases=DEMO_CASES, seed=seed)
    train_spec = _subset(full, full.cases[:-DEMO_TEST_CASES], out / "data" / "train")
    test_spec = _subset(full, full.cases[-DEMO_TEST_CASES:], out / "data" / "test")

    model_dir = out / "model"
    say(f"[demo] training `single` on CT for up to {minutes:g} min ({device})")
    config = TrainConfig(method="single", target="ct", preset="fast", minutes=minutes, epochs=60, device=device,
                         seed=seed, val_every=4)
    train(train_spec.root, model_dir, config, events=events)

    say("[demo] segmenting the held-out cases and scoring them")
    metrics = evaluate_model(model_dir, test_spec, device=device)
    write_json_atomic(out / "metrics.json", metrics)
    table = format_table(metrics)
    (out / "metrics.md").write_text(f"# Demo: `single` on phantom CT, held-out cases\n\n{table}\n")

    predictor = Predictor(model_dir, device=device)
    structures = predictor.task.structures
    overlays = []
    for case in test_spec.cases:
        result = predictor.predict({"ct": case.images["ct"]}, members=True, uncertainty=True)
        result.save(out / "predictions" / case.id)
        image = to_array(read_image(case.images["ct"]))
        reference = values_to_indices(to_array(read_image(case.labels["ct"]), np.float64), predictor.task.label_values)
        predicted = values_to_indices(to_array(result.label, np.float64), predictor.task.label_values)
        overlays.append(save_overlay(out / f"overlay_{case.id}.png", image,
                                     [("reference", reference), ("prediction", predicted)], structures,
                                     window=CT_SOFT_TISSUE_WINDOW,
                                     title=f"{case.id}: CT, mean Dice "
                                           f"{np.mean([v['dice'] for v in metrics['cases'][case.id].values() if v['dice'] is not None]):.3f}"))
    summary = {"seconds": round(time.time() - started, 1), "model": str(model_dir), "metrics": str(out / "metrics.json"),
               "overlays": [str(p) for p in overlays], "mean": metrics["mean"]}
    write_json_atomic(out / "summary.json", summary)
    say(f"[demo] done in {summary['seconds']} s\n{table}\nreport: {out}")
    return summary


def _subset(spec: DatasetSpec, cases: list, root: Path) -> DatasetSpec:
    sub = DatasetSpec(name=f"{spec.name}-{root.name}", labels=spec.labels, modalities=spec.modalities, cases=cases,
                      root=root)
    sub.save(root)
    return sub
