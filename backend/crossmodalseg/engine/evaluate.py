"""Evaluation: Dice and HD95 per structure and case (MONAI metrics, physical spacing), as JSON and a table."""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance

from ..data.geometry import resample_to_grid
from ..data.io import read_image, to_array
from ..data.spec import IGNORE_INDEX, DatasetError, DatasetSpec, load_spec, write_json_atomic
from ..data.transforms import values_to_indices
from .inferer import Predictor


def _one_hot(index: np.ndarray, num_classes: int) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.as_tensor(index, dtype=torch.long), num_classes).permute(3, 0, 1, 2)[None]


def score(prediction: np.ndarray, reference: np.ndarray, structures: Sequence[str],
          spacing_zyx: Sequence[float], regions: Mapping[str, Sequence[int]] | None = None) -> dict[str, dict]:
    """Dice and HD95 (mm) per structure of two class-index maps (z, y, x); None where undefined (both empty for
    Dice; either empty for HD95). `regions` adds unions of classes, e.g. BraTS whole tumour {1, 2, 3, 4}. Voxels the
    reference marks IGNORE_INDEX count for nothing: the prediction there is left out."""
    prediction = np.where(reference == IGNORE_INDEX, 0, prediction)
    groups = {name: [k] for k, name in enumerate(structures, start=1)}
    groups.update({name: list(classes) for name, classes in (regions or {}).items()})
    out: dict[str, dict] = {}
    for name, classes in groups.items():
        p = np.isin(prediction, classes).astype(np.int64)
        r = np.isin(reference, classes).astype(np.int64)
        hot_p, hot_r = _one_hot(p, 2), _one_hot(r, 2)
        if p.sum() == 0 and r.sum() == 0:
            out[name] = {"dice": None, "hd95": None}
            continue
        dice = float(compute_dice(hot_p, hot_r, include_background=False, ignore_empty=False)[0, 0])
        hd95 = None
        if p.sum() > 0 and r.sum() > 0:
            with warnings.catch_warnings():  # MONAI 1.6 warns about its own internal use of a deprecated argument
                warnings.simplefilter("ignore", FutureWarning)
                hd95 = float(compute_hausdorff_distance(hot_p, hot_r, include_background=False, percentile=95,
                                                        spacing=list(spacing_zyx))[0, 0])
        out[name] = {"dice": round(dice, 4), "hd95": None if hd95 is None else round(hd95, 2)}
    return out


def evaluate_model(model_dir: str | Path, dataset: str | Path | DatasetSpec, cases: Sequence[str] | None = None,
                   device: str = "auto", regions: Mapping[str, Sequence[int]] | None = None,
                   out_json: Path | None = None, members: bool = False,
                   save_predictions: Path | None = None) -> dict[str, Any]:
    """Predicts every labelled case that has the model's target modality and scores it against its label.
    `members`: also score each ensemble member on its own (results["members"][name] with "cases" and "mean"), so
    "the ensemble beats each member" can be measured. `save_predictions`: each case's prediction (label, members,
    disagreement map) is written to `save_predictions/<case id>/`, so nothing has to predict it again."""
    spec = dataset if isinstance(dataset, DatasetSpec) else load_spec(dataset)
    predictor = Predictor(model_dir, device=device)
    task = predictor.task
    # The structures must match; an "ignore" value belongs to each dataset's files (the reference's is used here).
    if sorted(zip(spec.structures, spec.label_values[1:])) != sorted(zip(task.structures, task.label_values[1:])):
        raise DatasetError(f"dataset labels {spec.labels} differ from the model's {task.labels}")
    chosen = [spec.case(c) for c in cases] if cases else spec.cases
    results: dict[str, Any] = {"model": str(model_dir), "dataset": spec.name, "cases": {}}
    for case in chosen:
        label_path = case.label_for(task.target)
        if task.target not in case.images or label_path is None:
            continue
        images = {m: p for m, p in case.images.items() if m in task.modalities}
        prediction = predictor.predict(images, members=members, uncertainty=save_predictions is not None)
        if save_predictions is not None:
            prediction.save(Path(save_predictions) / case.id)
        target_image = read_image(case.images[task.target])
        reference = resample_to_grid(read_image(label_path), target_image, "nearest")
        ref_index = values_to_indices(to_array(reference, np.float64), task.label_values, str(label_path),
                                      spec.ignore_value)
        spacing = list(target_image.GetSpacing())[::-1]

        def scored(label) -> dict[str, dict]:
            return score(values_to_indices(to_array(label, np.float64), task.label_values), ref_index,
                         task.structures, spacing, regions)

        results["cases"][case.id] = scored(prediction.label)
        if members and len(prediction.members) > 1:
            for name, label in prediction.members.items():
                results.setdefault("members", {}).setdefault(name, {"cases": {}})["cases"][case.id] = scored(label)
    if not results["cases"]:
        raise DatasetError(f"no case of {spec.name!r} has a labelled {task.target!r} image to evaluate")
    results["mean"] = _means(results["cases"])
    for member in results.get("members", {}).values():
        member["mean"] = _means(member["cases"])
    if out_json:
        write_json_atomic(Path(out_json), results)
    return results


def _means(per_case: dict[str, dict[str, dict]]) -> dict[str, dict]:
    names = next(iter(per_case.values())).keys()
    out = {}
    for name in names:
        out[name] = {}
        for metric in ("dice", "hd95"):
            values = [c[name][metric] for c in per_case.values() if c[name][metric] is not None]
            out[name][metric] = round(float(np.mean(values)), 4) if values else None
    return out


def format_table(results: dict[str, Any]) -> str:
    """A Markdown table: one row per case, Dice and HD95 per structure."""
    rows = dict(results["cases"])
    rows["mean"] = results["mean"]
    names = list(next(iter(rows.values())).keys())
    header = "| case | " + " | ".join(f"{n} Dice | {n} HD95 (mm)" for n in names) + " |"
    lines = [header, "|" + "---|" * (1 + 2 * len(names))]
    fmt = lambda v, d: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
    for case, metrics in rows.items():
        cells = [f"{fmt(metrics[n]['dice'], 3)} | {fmt(metrics[n]['hd95'], 1)}" for n in names]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    if results.get("members"):  # mean Dice of the ensemble and of each member alone
        lines += ["", "| mean Dice | " + " | ".join(names) + " |", "|" + "---|" * (1 + len(names))]
        for who, mean in [("ensemble", results["mean"])] + [(f"member {m}", r["mean"])
                                                            for m, r in results["members"].items()]:
            lines.append(f"| {who} | " + " | ".join(fmt(mean[n]["dice"], 3) for n in names) + " |")
    return "\n".join(lines)
