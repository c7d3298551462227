"""`crossmodalseg demo`: the main job on an embedded default, fully offline.

What only this project does, on the phantom (CT-like and MR-like images of one synthetic abdomen anatomy with known
liver, kidney and spleen labels): unpaired CT and MR cases, each from a different patient, few CT labels. It trains
the CT-only baseline (`single`) and `mkd` (the CT segmentor and an MR segmentor teaching each other by mutual
knowledge distillation) on the same labelled CT cases with the same time budget each, segments the same held-out CT
cases with both, and writes a report folder: metrics of the baseline, of the MKD ensemble and of each member (JSON
and Markdown), per-case PNG pictures (reference, baseline, ensemble, member disagreement) and both model folders.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .data.io import read_image
from .data.phantom import make_phantom_dataset
from .data.spec import DatasetSpec, write_json_atomic
from .data.transforms import values_to_indices
from .engine.checkpoint import read_model_meta
from .engine.evaluate import evaluate_model, format_table
from .engine.events import EventLog
from .engine.trainer import TrainConfig, train
from .errors import UserError
from .report import radiological, save_overlay

DEMO_CASES = 10  # unpaired: even cases are CT, odd cases MR (phantom layout)
HELD_OUT = ("case006", "case008")  # CT cases never trained on
CT_SOFT_TISSUE_WINDOW = (-160.0, 240.0)  # level 40 HU, width 400 HU
# MKD with histogram alignment: CT and MR intensities differ completely, and the MR member takes part in the CT
# ensemble only if it has learnt on CT-like images (without alignment it scored liver Dice 0.20 on CT, 0.56 with).
# And with kd_t2a_target: the MR member also learns the CT member's view of CT images, the images it is ensembled on
# (phantom CT + MR, 2 seeds: ensemble 0.585 / 0.688 without it, 0.813 / 0.783 with; backend/benchmarks/RESULTS.md).
# time_share: the model's training budget in units of `--minutes`. An MKD iteration trains two segmentors (3.4x the
# time of a baseline iteration on 2 CPU cores), and at equal minutes its 80 iterations did not find the spleen (nor
# did the baseline's at 80 iterations); 3x the baseline's minutes gives both about the same iterations (phantom,
# seeds 0 / 1: baseline 1 min, 190 iterations, spleen Dice 0.90 / 0.74; MKD 3 min, 165, 0.75 / 0.63).
# DEMO_MINUTES: the baseline's minutes by default. A minute goes less far on a slower machine: on 2026-12-06 one of
# the same kind made 107 baseline and 101 MKD iterations at 1 minute, and MKD found no spleen (Dice 0.000); at 2
# minutes, 210 and 198 iterations, spleen 0.897 (baseline) and 0.809 (MKD).
DEMO_MINUTES = 2.0
# About this many iterations find every organ (above: ~200 did; ~100 and, on 2026-12-07, 69 / 64 found no spleen).
# The budget is wall time, so a slower machine makes fewer: the report then says how many minutes would do.
DEMO_ENOUGH_ITERATIONS = 200
DEMO_MARKER = ".crossmodalseg-demo"  # marks a folder the demo made, and may replace


class DemoModel(NamedTuple):
    method: str
    assistants: list[str]
    options: dict[str, Any]
    time_share: float


MODELS = {"baseline": DemoModel("single", [], {}, time_share=1.0),
          "mkd": DemoModel("mkd", ["mr"], {"iam": "histogram", "kd_t2a_target": 1.0}, time_share=3.0)}


def run_demo(out: str | Path, minutes: float = DEMO_MINUTES, device: str = "auto", seed: int = 0,
             events: EventLog | None = None) -> dict[str, Any]:
    """Runs the demo into `out`; `minutes` is the baseline's training budget, MKD gets 3x (see MODELS)."""
    out = Path(out)
    started = time.time()
    events = events or EventLog()
    say = lambda msg: events.emit("log", message=msg)  # noqa: E731
    budgets = {name: minutes * model.time_share for name, model in MODELS.items()}
    # Settings checked before anything is built: a bad --minutes or --device ends the demo with one line.
    configs = {name: TrainConfig.parse({"method": model.method, "target": "ct", "assistants": model.assistants,
                                        "preset": "fast", "minutes": budgets[name], "device": device, "seed": seed,
                                        "val_every": 4, "options": model.options})
               for name, model in MODELS.items()}

    if _prepare_output(out):
        say(f"[demo] replacing the earlier demo's output in {out}")
    say(f"[demo] building the unpaired phantom dataset ({DEMO_CASES} cases: CT and MR of different patients) in "
        f"{out / 'data'}")
    full = make_phantom_dataset(out / "data", n_cases=DEMO_CASES, seed=seed, paired=False)
    train_spec = _subset(full, [c for c in full.cases if c.id not in HELD_OUT], out / "data" / "train")
    test_spec = _subset(full, [c for c in full.cases if c.id in HELD_OUT], out / "data" / "test")
    n_ct = sum("ct" in c.images for c in train_spec.cases)
    n_mr = sum("mr" in c.images for c in train_spec.cases)

    results: dict[str, dict] = {}
    iterations: dict[str, int] = {}
    for name, model in MODELS.items():
        method = model.method
        what = "CT only" if not model.assistants else f"CT + unpaired MR ({n_mr} MR cases of other patients)"
        say(f"[demo] training `{method}` on {what}, {n_ct} labelled CT cases, up to {budgets[name]:g} min ({device})")
        train(train_spec.root, out / name / "model", configs[name], events=events)
        iterations[name] = int(read_model_meta(out / name / "model")["training"]["iterations"])
        say(f"[demo] segmenting the held-out CT cases with `{method}` and scoring them")
        results[name] = evaluate_model(out / name / "model", test_spec, device=device, members=True,
                                       save_predictions=out / "predictions" / name)
        write_json_atomic(out / name / "metrics.json", results[name])

    report = _report(results, iterations, budgets, n_ct, n_mr)
    (out / "metrics.md").write_text(report)
    overlays = _pictures(out, test_spec, results)
    summary = {"seconds": round(time.time() - started, 1), "minutes": budgets,
               "models": {name: str(out / name / "model") for name in MODELS},
               "mean": {name: r["mean"] for name, r in results.items()},
               "members": {m: r["mean"] for m, r in results["mkd"].get("members", {}).items()},
               "iterations": iterations,
               "overlays": [str(p) for p in overlays]}
    write_json_atomic(out / "summary.json", summary)
    say(f"[demo] done in {summary['seconds']} s\n{report}\nreport: {out}")
    return summary


def _prepare_output(out: Path) -> bool:
    """Makes `out` the demo's folder; True when it held an earlier demo's output (removed: the demo runs again). A
    folder holding anything else is refused before anything is written (the demo once overwrote a dataset there and
    then refused the models folder it had found)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; give the demo a folder (--out)")
    earlier = out.is_dir() and any(out.iterdir())
    if earlier:
        if not (out / DEMO_MARKER).is_file():
            raise UserError(f"{out} already holds files that are not an earlier demo's output; give the demo an empty "
                            f"or new folder (--out)")
        for child in out.iterdir():
            if child.name != DEMO_MARKER:
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("this folder holds the output of `crossmodalseg demo`, which replaces it when it "
                                   "runs here again\n")
    return earlier


def _report(results: dict[str, dict], iterations: dict[str, int], budgets: dict[str, float], n_ct: int,
            n_mr: int) -> str:
    structures = list(results["baseline"]["mean"])
    rows = [("`single`, CT only", results["baseline"]["mean"], "baseline"),
            ("`mkd` ensemble", results["mkd"]["mean"], "mkd")]
    rows += [(f"`mkd` member {m} alone", r["mean"], "mkd") for m, r in results["mkd"].get("members", {}).items()]
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    lines = [f"# Demo: unpaired CT + MR, {n_ct} labelled CT cases, {n_mr} MR cases of other patients",
             "", f"Held-out CT cases {', '.join(HELD_OUT)}. Mean Dice:", "",
             "| model | " + " | ".join(structures) + " | training minutes | training iterations |",
             "|" + "---|" * (3 + len(structures))]
    lines += [f"| {who} | " + " | ".join(fmt(mean[s]["dice"]) for s in structures)
              + f" | {budgets[name]:g} | {iterations[name]} |" for who, mean, name in rows]
    lines += ["", "An MKD iteration trains two segmentors and distils each into the other, so MKD gets "
                  f"{budgets['mkd'] / budgets['baseline']:g}x the baseline's minutes, for about as many iterations "
                  "(`--minutes` sets the baseline's). Two held-out cases and one seed: a first look, not a comparison "
                  "of methods (backend/benchmarks/ has those, with seeds and spread).", ""]
    fewest = min(iterations.values())
    if fewest < DEMO_ENOUGH_ITERATIONS:
        enough = math.ceil(budgets["baseline"] * DEMO_ENOUGH_ITERATIONS / max(fewest, 1) * 10) / 10
        lines += [f"This machine made only {fewest} iterations in a model's budget; about "
                  f"{DEMO_ENOUGH_ITERATIONS} find every organ. For the demo's full result run it with "
                  f"`--minutes {enough:g}`.", ""]
    for name, r in results.items():
        lines += [f"## {name}", "", format_table(r), ""]
    return "\n".join(lines)


def _pictures(out: Path, test_spec: DatasetSpec, results: dict[str, dict]) -> list[Path]:
    """One overlay per held-out case, from the predictions evaluate_model saved (nothing is predicted twice)."""
    def index(path: Path) -> np.ndarray:
        return values_to_indices(radiological(read_image(path), np.float64), test_spec.label_values)

    overlays = []
    for case in test_spec.cases:
        saved = {name: out / "predictions" / name / case.id for name in MODELS}
        image = radiological(read_image(case.images["ct"]))
        dice = {name: np.mean([v["dice"] for v in r["cases"][case.id].values() if v["dice"] is not None])
                for name, r in results.items()}
        disagreement = saved["mkd"] / "segmentation_disagreement.nii.gz"
        heatmap = ("member disagreement", radiological(read_image(disagreement))) if disagreement.exists() else None
        overlays.append(save_overlay(
            out / f"overlay_{case.id}.png", image,
            [("reference", index(case.labels["ct"])),
             (f"CT only: Dice {dice['baseline']:.2f}", index(saved["baseline"] / "segmentation.nii.gz")),
             (f"MKD ensemble: Dice {dice['mkd']:.2f}", index(saved["mkd"] / "segmentation.nii.gz"))],
            test_spec.structures, window=CT_SOFT_TISSUE_WINDOW, heatmap=heatmap, title=f"{case.id} (held-out CT)"))
    return overlays


def _subset(spec: DatasetSpec, cases: list, root: Path) -> DatasetSpec:
    sub = DatasetSpec(name=f"{spec.name}-{root.name}", labels=spec.labels, modalities=spec.modalities, cases=cases,
                      root=root)
    sub.save(root)
    return sub
