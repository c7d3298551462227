"""Methods benchmark on real brain MRI: each method against the baseline it exists to beat, with cross-validation
and several seeds, on BraTS 2015 FLAIR + T1c (4 labelled cases) and the unlabelled BraTS 2023 case.

Cross-validation: the labelled cases are split into folds (default 2 folds of 2 cases, as `bench_recipe.py`: every
case held out once, the other fold's cases train; `--folds 4` holds out one case at a time and trains on three),
each fold with every seed; one network preset and one training budget (iterations) for every experiment, whose wall
time is recorded (a method that needs more time than its baseline shows it). Dice of the BraTS regions (whole tumour
WT, tumour core TC, enhancing tumour ET) on the held-out cases, one value per run: their mean. The report gives each
experiment's mean and spread (standard deviation over folds x seeds) and, for each comparison, the paired difference
(same fold, same seed) with its spread and how many runs it won: a difference inside its spread is no result.
Resumable: runs already in `--out` are kept. Why 2 folds by default: 3 seeds x 4 folds take 3.2 hours on 2 CPU
cores (RESULTS.md), 3 seeds x 2 folds 1.91 (measured), inside the 2 hours a benchmark may take; it is also the few-label
setting (2 labelled cases per training set).

    python backend/benchmarks/methods.py --mode cpu --seeds 0 1 2 --out backend/benchmarks/methods_2fold_cpu.json
    python backend/benchmarks/methods.py --mode full --device cuda --out methods_gpu.json     # on a GPU

Experiments per fold (training cases t0, t1, ... in name order):
- `single` early fusion (FLAIR+T1c), labelled on all of them;
- `maml` FLAIR+T1c on the same, against early fusion and against each of its own branches (the same model scored
  with FLAIR alone and with T1c alone, i.e. its branch heads); the paper's half-width branches only when named
  (`--only half-width`): that question is answered (maml.py's docstring);
- `mkd` unpaired: T1c target labelled on t0 only, FLAIR of the others as assistant; against `single` T1c on t0 alone;
- `cmc`: t0 labelled + the others and BraTS 2023 unlabelled; against `single` early fusion on t0 alone and against the
  same two-branch network supervised only (`cmc` with both consistency weights 0).
Ensembles (MKD, CMC) are also scored member by member against the reference, and the `single` models also with
8-fold test-time mirroring, so "the ensemble beats each member" and "mirroring helps" are measured on the same runs.
Modes: `cpu` resamples to 3 mm and trains 200 iterations (preset `fast`); `full` keeps 1 mm (preset `full`) and trains
1000 iterations.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from crossmodalseg.data.spec import write_json_atomic

ROOT = Path(__file__).resolve().parents[3] / "shared" / "data"
BRATS = ROOT / "brats2015_flair_t1c"
BRATS_2023 = ROOT / "brats2023_gli_unlabelled"
LABELS = {"background": 0, "necrosis": 1, "edema": 2, "non-enhancing": 3, "enhancing": 4}
REGIONS = {"WT": [1, 2, 3, 4], "TC": [1, 3, 4], "ET": [4]}
LABELLED = ["brats_2013_pat0003_1", "brats_2013_pat0004_1", "brats_2013_pat0005_1", "brats_2013_pat0006_1"]
MODES = {"cpu": {"spacing": 3.0, "preset": "fast", "epochs": 8, "iterations": 25},
         "full": {"spacing": 1.0, "preset": "full", "epochs": 10, "iterations": 100}}
BOTH = ["flair", "t1c"]


@dataclass(frozen=True)
class Experiment:
    name: str
    dataset: str  # a key of `fold_datasets`
    method: str
    target: str
    assistants: list[str]
    options: dict = field(default_factory=dict)
    inputs: list[str] = field(default_factory=lambda: list(BOTH))  # what it is scored with
    missing: bool = False  # also scored with each input alone (MAML)
    mirrored: bool = False  # also scored with 8-fold test-time mirroring (`predict --tta`): does it help?
    default: bool = True  # run without --only (an ablation whose question is answered runs only when named)


EXPERIMENTS = [
    Experiment("single FLAIR+T1c (early fusion)", "paired", "single", "flair", ["t1c"], mirrored=True),
    Experiment("maml FLAIR+T1c", "paired", "maml", "flair", ["t1c"], missing=True),
    Experiment("maml FLAIR+T1c, half-width branches (the paper's)", "paired", "maml", "flair", ["t1c"], {"width": 0.5},
               missing=True, default=False),
    # METHODS.md's two options beyond the paper, benchmarked (RESULTS.md): does either lift the fused head?
    Experiment("maml FLAIR+T1c, modality dropout 0.5", "paired", "maml", "flair", ["t1c"], {"modality_dropout": 0.5},
               missing=True, default=False),
    Experiment("maml FLAIR+T1c, KD fused head -> branches (weight 1)", "paired", "maml", "flair", ["t1c"],
               {"kd_weight": 1.0}, missing=True, default=False),
    # what a dedicated one-modality model reaches on MAML's cases: the bar for MAML with the other modality missing
    Experiment("single T1c, maml's cases", "paired", "single", "t1c", [], inputs=["t1c"], default=False),
    Experiment("single FLAIR, maml's cases", "paired", "single", "flair", [], inputs=["flair"], default=False),
    Experiment("mkd T1c target + unpaired FLAIR", "unpaired", "mkd", "t1c", ["flair"], inputs=["t1c"]),
    # ablation (not in the paper): seg_target also distils into seg_assistant on target images, where both ensemble
    Experiment("mkd ablation: KD t->a on target images too", "unpaired", "mkd", "t1c", ["flair"],
               {"kd_t2a_target": 1.0}, inputs=["t1c"], default=False),
    Experiment("single T1c, mkd's labelled case", "t1c_one", "single", "t1c", [], inputs=["t1c"], mirrored=True),
    Experiment("cmc 1 labelled + unlabelled pairs", "semi", "cmc", "t1c", ["flair"]),
    Experiment("cmc supervised only, its labelled case", "one_labelled", "cmc", "t1c", ["flair"],
               {"csc_weight": 0.0, "cac_weight": 0.0}),
    Experiment("single FLAIR+T1c (early fusion), cmc's labelled case", "one_labelled", "single", "t1c", ["flair"]),
    # which consistency term costs CMC on BraTS (its answer: RESULTS.md)
    Experiment("cmc ablation: CSC only (CAC weight 0)", "semi", "cmc", "t1c", ["flair"], {"cac_weight": 0.0},
               default=False),
    Experiment("cmc ablation: CAC weight 1 (the previous default)", "semi", "cmc", "t1c", ["flair"],
               {"cac_weight": 1.0}, default=False),
]
# (method, baseline): the claims of issue 10, each checked on paired runs (same fold, same seed). "experiment @ inputs"
# names a run scored with those inputs only (MAML's fused head against its own branches), or by one member of an
# ensemble ("@ t1c: seg_target"), or with test-time mirroring ("@ flair+t1c mirrored").
COMPARISONS = [
    ("maml FLAIR+T1c", "single FLAIR+T1c (early fusion)"),
    ("maml FLAIR+T1c", "maml FLAIR+T1c @ flair"),
    ("maml FLAIR+T1c", "maml FLAIR+T1c @ t1c"),
    ("maml FLAIR+T1c", "maml FLAIR+T1c, half-width branches (the paper's)"),
    ("maml FLAIR+T1c, modality dropout 0.5", "maml FLAIR+T1c"),
    ("maml FLAIR+T1c, modality dropout 0.5", "single FLAIR+T1c (early fusion)"),
    ("maml FLAIR+T1c, KD fused head -> branches (weight 1)", "maml FLAIR+T1c"),
    ("maml FLAIR+T1c, KD fused head -> branches (weight 1)", "single FLAIR+T1c (early fusion)"),
    ("maml FLAIR+T1c @ t1c", "single T1c, maml's cases"),  # FLAIR missing: MAML's T1c branch predicts
    ("maml FLAIR+T1c @ flair", "single FLAIR, maml's cases"),
    ("mkd T1c target + unpaired FLAIR", "single T1c, mkd's labelled case"),
    ("mkd ablation: KD t->a on target images too", "single T1c, mkd's labelled case"),
    ("mkd ablation: KD t->a on target images too", "mkd T1c target + unpaired FLAIR"),
    ("cmc 1 labelled + unlabelled pairs", "single FLAIR+T1c (early fusion), cmc's labelled case"),
    ("cmc 1 labelled + unlabelled pairs", "cmc supervised only, its labelled case"),
    ("cmc ablation: CSC only (CAC weight 0)", "cmc supervised only, its labelled case"),
    ("cmc ablation: CAC weight 1 (the previous default)", "cmc supervised only, its labelled case"),
    # an ensemble against each of its members (the members' own Dice against the reference)
    ("mkd T1c target + unpaired FLAIR", "mkd T1c target + unpaired FLAIR @ t1c: seg_target"),
    ("mkd T1c target + unpaired FLAIR", "mkd T1c target + unpaired FLAIR @ t1c: seg_assistant"),
    ("cmc 1 labelled + unlabelled pairs", "cmc 1 labelled + unlabelled pairs @ flair+t1c: decoder_a"),
    ("cmc 1 labelled + unlabelled pairs", "cmc 1 labelled + unlabelled pairs @ flair+t1c: decoder_b"),
    # test-time mirroring (issue 9): the same model with and without it
    ("single FLAIR+T1c (early fusion) @ flair+t1c mirrored", "single FLAIR+T1c (early fusion)"),
    ("single T1c, mkd's labelled case @ t1c mirrored", "single T1c, mkd's labelled case"),
]


def prepare(root: Path, spacing: float) -> dict[str, dict[str, Path]]:
    """Writes every image (resampled when spacing > 1 mm) and returns {case: {"flair", "t1c", "seg"?: path}}."""
    from crossmodalseg.data.geometry import resample_to_spacing
    from crossmodalseg.data.io import read_image, write_image

    def put(src: Path, dst: Path, interpolator: str = "linear") -> Path:
        image = read_image(src)
        if spacing != 1.0:
            image = resample_to_spacing(image, (spacing,) * 3, interpolator)
        return write_image(image, dst)

    files = {}
    for case in LABELLED:
        folder = BRATS / case
        files[case] = {"flair": put(folder / "Flair_subtrMeanDivStd.nii.gz", root / case / "flair.nii.gz"),
                       "t1c": put(folder / "T1c_subtrMeanDivStd.nii.gz", root / case / "t1c.nii.gz"),
                       "seg": put(folder / "OTMultiClass.nii.gz", root / case / "seg.nii.gz", "nearest")}
    files["brats2023"] = {"flair": put(BRATS_2023 / "BraTS-GLI-00001-000-t2f.nii.gz", root / "u" / "flair.nii.gz"),
                          "t1c": put(BRATS_2023 / "BraTS-GLI-00001-000-t1c.nii.gz", root / "u" / "t1c.nii.gz")}
    return files


def dataset(root: Path, name: str, entries: list[tuple[str, list[str], list[str]]], files) -> Path:
    """entries: (case, modalities with images, modalities with labels)."""
    from crossmodalseg.data.spec import Case, DatasetSpec

    # BraTS images of one case are co-registered (one label serves both), and the spec says so.
    cases = [Case(c, {m: files[c][m] for m in images}, {m: files[c]["seg"] for m in labels},
                  co_registered=len(images) > 1) for c, images, labels in entries]
    spec = DatasetSpec(name, LABELS, {"flair": "MR", "t1c": "MR"}, cases, root / name)
    spec.save()
    return spec.root


def folds_of(cases: list, n_folds: int) -> list[list]:
    """The held-out cases of each fold: every n-th case in name order (the benchmarks' one split; `bench_recipe.py`
    uses it too)."""
    return [cases[i::n_folds] for i in range(n_folds)]


def fold_id(held_out: list[str]) -> str:
    """A fold's key in the results: its held-out cases (one case: its name, as in the 4-fold files)."""
    return "+".join(held_out)


def fold_datasets(work: Path, held_out: list[str], files) -> dict[str, Path]:
    """The datasets of one fold, from the labelled cases that are not held out (t0 the first in name order)."""
    t0, *others = [c for c in LABELLED if c not in held_out]
    root = work / f"fold_{fold_id(held_out)}"
    return {
        "test": dataset(root, "test", [(c, BOTH, BOTH) for c in held_out], files),
        "paired": dataset(root, "paired", [(c, BOTH, BOTH) for c in (t0, *others)], files),
        "unpaired": dataset(root, "unpaired", [(t0, ["t1c"], ["t1c"])] + [(c, ["flair"], ["flair"]) for c in others],
                            files),
        "t1c_one": dataset(root, "t1c_one", [(t0, ["t1c"], ["t1c"])], files),
        "semi": dataset(root, "semi", [(t0, BOTH, BOTH)] + [(c, BOTH, []) for c in others]
                        + [("brats2023", BOTH, [])], files),
        "one_labelled": dataset(root, "one_labelled", [(t0, BOTH, BOTH)], files),
    }


def run_one(experiment: Experiment, data: dict[str, Path], seed: int, mode: dict, device: str, work: Path) -> dict:
    from crossmodalseg.engine.events import read_events
    from crossmodalseg.engine.trainer import TrainConfig, train

    config = TrainConfig(method=experiment.method, target=experiment.target, assistants=experiment.assistants,
                         preset=mode["preset"], epochs=mode["epochs"], iterations_per_epoch=mode["iterations"],
                         device=device, val_every=mode["epochs"], seed=seed, options=experiment.options)
    started = time.time()
    model = train(data[experiment.dataset], work / "model", config)
    seconds = time.time() - started
    # each member scored alone too, except where the inputs alone score them already (MAML's branches)
    scores = score(model, data["test"], experiment.inputs, device, members=not experiment.missing)
    if experiment.mirrored:
        scores.update(score(model, data["test"], experiment.inputs, device, tta=True))
    if experiment.missing:
        for m in experiment.inputs:
            scores.update(score(model, data["test"], [m], device))
    last_epoch = [e for e in read_events(model / "events.jsonl") if e["event"] == "epoch"][-1]
    extra = {"alignment_dice": last_epoch["alignment_dice"]} if "alignment_dice" in last_epoch else {}  # MKD's IAM
    return {"train_seconds": round(seconds, 1), "scores": scores, **extra}


def run(args: argparse.Namespace) -> dict:
    from crossmodalseg.engine.trainer import software_versions

    mode = MODES[args.mode]
    if not 2 <= args.folds <= len(LABELLED):
        raise SystemExit(f"--folds must be 2 to {len(LABELLED)}")
    if args.only_fold and not set(args.only_fold) <= set(range(args.folds)):
        raise SystemExit(f"--only-fold: folds are numbered 0 to {args.folds - 1}")
    folds = folds_of(LABELLED, args.folds)
    previous = json.loads(args.out.read_text()) if args.out and args.out.exists() else {}
    previous_folds = previous.get("folds", len(LABELLED))  # files before --folds held out 1 of 4
    if previous and previous_folds != args.folds:
        raise SystemExit(f"{args.out} holds a {previous_folds}-fold run; give another --out")
    runs: list[dict] = [r for r in previous.get("runs", []) if previous.get("mode") == args.mode]
    done = {(r["experiment"], r["held_out"], r["seed"]) for r in runs}
    names = {e.name for e in EXPERIMENTS}

    def chosen(e: Experiment) -> bool:  # --only: a name chooses that experiment, other text every name holding it
        if not args.only:
            return e.default
        return e.name in args.only or any(o in e.name for o in args.only if o not in names)

    experiments = [e for e in EXPERIMENTS if chosen(e)]
    if not experiments:
        raise SystemExit(f"--only {' '.join(args.only)} names no experiment; they are: "
                         + "; ".join(sorted(names)))
    report = {"benchmark": "methods", "mode": args.mode, "budget": mode, "device": args.device,
              "command": " ".join(sys.argv), "software": software_versions(), "machine": platform.machine(),
              "labelled_cases": LABELLED, "folds": args.folds, "runs": runs}
    if previous.get("note"):  # where the file's earlier runs came from, when it was assembled from other files
        report["note"] = previous["note"]
    with tempfile.TemporaryDirectory(prefix="cms-methods-") as tmp:
        work = Path(tmp)
        files = prepare(work / "images", mode["spacing"])
        for seed in args.seeds:  # seed-major: a stopped run still holds every fold of its first seeds
            for index, held_out in enumerate(folds):
                if args.only_fold and index not in args.only_fold:
                    continue
                key = fold_id(held_out)
                data = fold_datasets(work, held_out, files)
                for experiment in experiments:
                    if (experiment.name, key, seed) in done:
                        continue
                    print(f"[methods] seed {seed}, held out {key}: {experiment.name}", file=sys.stderr, flush=True)
                    result = run_one(experiment, data, seed, mode, args.device,
                                     work / f"{index}_{seed}_{EXPERIMENTS.index(experiment)}")
                    runs.append({"experiment": experiment.name, "method": experiment.method,
                                 "options": experiment.options, "held_out": key, "seed": seed, **result})
                    report["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
                    report["summary"], report["comparisons"] = summarise(runs), compare(runs)
                    if args.out:  # after every run: a stopped benchmark resumes where it was
                        write_json_atomic(args.out, report)
    report["summary"], report["comparisons"] = summarise(runs), compare(runs)
    return report


def run_value(run: dict, inputs: str, region: str) -> float | None:
    """One number per run: the mean Dice of its held-out cases (a case whose reference and prediction are both empty
    has none; None if no case has one)."""
    values = [v[region] for v in run["scores"][inputs].values() if v[region] is not None]
    return statistics.mean(values) if values else None


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return round(statistics.mean(values), 3), round(statistics.stdev(values), 3) if len(values) > 1 else 0.0


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    for experiment in dict.fromkeys(r["experiment"] for r in runs):
        chosen = [r for r in runs if r["experiment"] == experiment]
        for inputs in dict.fromkeys(k for r in chosen for k in r["scores"]):  # runs before member scores lack them
            scored = [r for r in chosen if inputs in r["scores"]]
            row = {"experiment": experiment, "inputs": inputs, "runs": len(scored),
                   "train_s_mean": round(statistics.mean(r["train_seconds"] for r in scored), 1)}
            for region in REGIONS:
                values = [v for v in (run_value(r, inputs, region) for r in scored) if v is not None]
                if values:
                    row[region], row[f"{region}_sd"] = _mean_sd(values)
            rows.append(row)
    return rows


def add_paired(row: dict, region: str, pairs: list[tuple[float | None, float | None]]) -> None:
    """Adds a region's paired differences (first - second, pairs with both values) to `row`: mean, sd, wins, and
    whether the mean is beyond noise (larger than the spread of the differences)."""
    diffs = [a - b for a, b in pairs if a is not None and b is not None]
    if diffs:
        row["pairs"] = max(row["pairs"], len(diffs))
        row[region], row[f"{region}_sd"] = _mean_sd(diffs)
        row[f"{region}_wins"] = sum(d > 0 for d in diffs)
        row[f"{region}_beyond_spread"] = len(diffs) > 1 and abs(statistics.mean(diffs)) > statistics.stdev(diffs)


def compare(runs: list[dict]) -> list[dict]:
    """Paired differences method - baseline over the (fold, seed) runs both have, with their spread and wins."""
    by_key = {(r["experiment"], r["held_out"], r["seed"]): r for r in runs}

    def value(name: str, held_out: str, seed: int, region: str) -> float | None:
        experiment, _, inputs = name.partition(" @ ")
        run = by_key.get((experiment, held_out, seed))
        if run is None:
            return None
        inputs = inputs or next(iter(run["scores"]))  # no "@": the run's own score
        return run_value(run, inputs, region) if inputs in run["scores"] else None  # older runs lack member scores

    out = []
    for method, baseline in COMPARISONS:
        keys = sorted({(r["held_out"], r["seed"]) for r in runs})
        row = {"method": method, "baseline": baseline, "pairs": 0}
        for region in REGIONS:
            add_paired(row, region, [(value(method, h, s, region), value(baseline, h, s, region)) for h, s in keys])
        if row["pairs"]:
            out.append(row)
    return out


def against(runs: list[dict], earlier: list[dict]) -> list[dict]:
    """Each experiment (and each way it was scored) against the same experiment, fold and seed in `earlier` runs (a
    results file made before a default changed): paired differences, this minus earlier, with spread and wins."""
    before = {(r["experiment"], r["held_out"], r["seed"]): r for r in earlier}
    out = []
    for experiment in dict.fromkeys(r["experiment"] for r in runs):
        pairs = [(r, before.get((experiment, r["held_out"], r["seed"]))) for r in runs if r["experiment"] == experiment]
        pairs = [(now, then) for now, then in pairs if then is not None]
        for inputs in dict.fromkeys(k for now, _ in pairs for k in now["scores"]):
            row = {"experiment": experiment, "inputs": inputs, "pairs": 0}
            for region in REGIONS:
                add_paired(row, region, [(run_value(now, inputs, region), run_value(then, inputs, region))
                                          for now, then in pairs if inputs in now["scores"] and inputs in then["scores"]])
            if row["pairs"]:
                out.append(row)
    return out


def score(model: Path, test_set: Path, inputs: list[str], device: str, members: bool = False, tta: bool = False
          ) -> dict[str, dict[str, dict[str, float | None]]]:
    """Region Dice per test case, predicting from `inputs` only; the label is the case's (shared) segmentation.
    Keyed by what predicted: the model ("flair+t1c") and, with `members` where it has several, each member on its
    own ("flair+t1c: decoder_a"), so an ensemble can be compared with its members; with `tta`, predicted with
    8-fold mirroring ("flair+t1c mirrored")."""
    import numpy as np

    from crossmodalseg.data.io import read_image, to_array
    from crossmodalseg.data.spec import load_spec
    from crossmodalseg.data.transforms import values_to_indices
    from crossmodalseg.engine.evaluate import score as score_maps
    from crossmodalseg.engine.inferer import Predictor

    predictor = Predictor(model, device=device, tta=tta)
    name = "+".join(inputs) + (" mirrored" if tta else "")
    out: dict[str, dict[str, dict[str, float | None]]] = {name: {}}
    for case in load_spec(test_set).cases:
        result = predictor.predict({m: case.images[m] for m in inputs}, members=members)
        reference = values_to_indices(to_array(read_image(case.labels["flair"]), np.float64), list(LABELS.values()))
        spacing = list(read_image(case.images[inputs[0]]).GetSpacing())[::-1]
        each = result.members if len(result.members) > 1 else {}
        for key, label in {name: result.label, **{f"{name}: {m}": image for m, image in each.items()}}.items():
            predicted = values_to_indices(to_array(label, np.float64), list(LABELS.values()))
            scores = score_maps(predicted, reference, [], spacing, REGIONS)
            out.setdefault(key, {})[case.id] = {r: scores[r]["dice"] for r in REGIONS}
    return out


def markdown(report: dict) -> str:
    fmt = lambda row, r: "–" if r not in row else f"{row[r]:.3f} ± {row[r + '_sd']:.3f}"  # noqa: E731
    lines = [f"Mode `{report['mode']}` ({report['budget']}), device `{report['device']}`; "
             f"{report.get('folds', len(LABELLED))} folds, each labelled case held out once, "
             f"seeds {sorted({r['seed'] for r in report['runs']})}; mean ± sd over folds x seeds.", "",
             "| experiment | inputs | runs | WT | TC | ET | train s |", "|---|---|---|---|---|---|---|"]
    for row in report["summary"]:
        lines.append(f"| {row['experiment']} | {row['inputs']} | {row['runs']} | {fmt(row, 'WT')} | "
                     f"{fmt(row, 'TC')} | {fmt(row, 'ET')} | {row['train_s_mean']} |")
    cells = lambda row: " | ".join(  # noqa: E731
        f"{fmt(row, r)} ({row.get(r + '_wins', '–')}/{row['pairs']})"
        + (" **beyond spread**" if row.get(f"{r}_beyond_spread") else "") for r in REGIONS)
    lines += ["", "Paired differences (method - baseline, same fold and seed), wins out of pairs:", "",
              "| method | baseline | pairs | WT | TC | ET |", "|---|---|---|---|---|---|"]
    for row in report["comparisons"]:
        lines.append(f"| {row['method']} | {row['baseline']} | {row['pairs']} | {cells(row)} |")
    if report.get("against"):
        lines += ["", f"Against the same experiments in `{report['against_file']}` (this run - that one, same fold "
                      "and seed), wins out of pairs:", "",
                  "| experiment | inputs | pairs | WT | TC | ET |", "|---|---|---|---|---|---|"]
        for row in report["against"]:
            lines.append(f"| {row['experiment']} | {row['inputs']} | {row['pairs']} | {cells(row)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=list(MODES), default="cpu")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--folds", type=int, default=2, help="cross-validation folds (2: two held-out cases each; "
                                                              "4: one)")
    parser.add_argument("--only-fold", type=int, nargs="+", help="run only these folds (0-based; a quick look)")
    parser.add_argument("--iterations", type=int, help="iterations per epoch instead of the mode's (quick checks)")
    parser.add_argument("--only", nargs="*", help="run these experiments (a name, or text a name contains)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--against", type=Path, help="an earlier results file: pair each run with its run there "
                                                      "(same experiment, fold, seed), e.g. before a default changed")
    args = parser.parse_args(argv)
    if args.iterations:
        MODES[args.mode] = {**MODES[args.mode], "iterations": args.iterations}
    report = run(args)
    if args.against:
        report["against_file"] = args.against.name
        report["against"] = against(report["runs"], json.loads(args.against.read_text())["runs"])
        if args.out:
            write_json_atomic(args.out, report)
    table = markdown(report)
    if args.out:
        args.out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
