"""Accuracy per minute: the product's `single` against a plain MONAI recipe, at equal wall time, on real BraTS cases.

The plain recipe lives here, not in the product. It is what a MONAI tutorial would do:
- MONAI `UNet` with channels 16-32-64-128 and strides 2-2-2 (defaults: `num_res_units=0`, one convolution per level);
- images resampled to 2 mm, each channel z-scored with MONAI's `NormalizeIntensity`;
- batches of 4 patches of 48³ from `RandCropByPosNegLabeld` (pos 1 : neg 1);
- `DiceCELoss`, AdamW at a constant 1e-3;
- no deep supervision, no validation, no augmentation;
- trains until its wall-time budget (preprocessing included) is spent.
The product runs as users run it: `crossmodalseg train DATA --method single --minutes M` in a fresh process, and its
whole wall time is recorded, so `--minutes` is checked as well.

Cross-validation: the labelled cases are split into folds (default 2 folds of 2 cases); each fold is held out once
while the others train. Each (fold, seed, budget) trains both recipes, one after the other (the order alternates),
so that a change in the machine's speed affects both. Held-out cases are scored at their own 1 mm grid with the
BraTS regions WT, TC, ET. The report pairs the two recipes by (fold, seed): product minus plain, with the spread
of the differences and how many pairs the product wins.

    python backend/benchmarks/bench_recipe.py --minutes 2 4 8 --seeds 0 1 2 --out backend/benchmarks/recipe_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from methods import add_paired, folds_of  # the benchmarks' one rule for paired differences and one split

BRATS = Path(__file__).resolve().parents[3] / "shared" / "data" / "brats2015_flair_t1c"
FILES = {"flair": "Flair_subtrMeanDivStd.nii.gz", "t1c": "T1c_subtrMeanDivStd.nii.gz"}
LABEL_FILE = "OTMultiClass.nii.gz"
LABELS = {"background": 0, "necrosis": 1, "edema": 2, "non-enhancing": 3, "enhancing": 4}
REGIONS = {"WT": [1, 2, 3, 4], "TC": [1, 3, 4], "ET": [4]}
PLAIN_SPACING = 2.0
PLAIN_PATCH = (48, 48, 48)
PLAIN_BATCH = 4


# ---- data -------------------------------------------------------------------------------------------------------
def case_folders() -> list[Path]:
    folders = sorted(p for p in BRATS.iterdir() if p.is_dir())
    if not folders:
        sys.exit(f"no BraTS cases under {BRATS}")
    return folders


def write_dataset(root: Path, folders: list[Path], modalities: list[str]) -> Path:
    """A dataset.json over the original files (every modality shares the case's one label: co-registered)."""
    from crossmodalseg.data.spec import Case, DatasetSpec

    cases = [Case(f.name, {m: f / FILES[m] for m in modalities}, {m: f / LABEL_FILE for m in modalities})
             for f in folders]
    spec = DatasetSpec("brats", LABELS, {m: "MR" for m in modalities}, cases, root)
    spec.save()
    return root


def score_prediction(predicted, folder: Path) -> dict[str, float | None]:
    """WT/TC/ET Dice of a label image (on-disk values) against the case's reference, on the reference's grid."""
    import numpy as np

    from crossmodalseg.data.io import read_image, to_array
    from crossmodalseg.engine.evaluate import score

    reference = to_array(read_image(folder / LABEL_FILE), np.int64)
    scores = score(to_array(predicted, np.int64), reference, [], (1.0, 1.0, 1.0), REGIONS)
    return {region: scores[region]["dice"] for region in REGIONS}


# ---- the plain recipe (runs in its own process: `bench_recipe.py plain ...`) --------------------------------------
def plain_preprocess(folder: Path, modalities: list[str], with_label: bool):
    import numpy as np
    from monai.transforms import NormalizeIntensity

    from crossmodalseg.data.geometry import resample_to_spacing
    from crossmodalseg.data.io import read_image, to_array

    images = [resample_to_spacing(read_image(folder / FILES[m]), (PLAIN_SPACING,) * 3) for m in modalities]
    stacked = np.stack([to_array(i) for i in images])
    stacked = np.asarray(NormalizeIntensity(channel_wise=True)(stacked), dtype=np.float32)
    out = {"image": stacked, "grid": images[0]}
    if with_label:
        label = resample_to_spacing(read_image(folder / LABEL_FILE), (PLAIN_SPACING,) * 3, "nearest")
        out["label"] = to_array(label, np.int64)[None]
    return out


def plain_network(in_channels: int):
    from monai.networks.nets import UNet

    return UNet(spatial_dims=3, in_channels=in_channels, out_channels=len(LABELS), channels=(16, 32, 64, 128),
                strides=(2, 2, 2))


def plain_run(train: list[Path], test: list[Path], modalities: list[str], minutes: float, seed: int) -> dict:
    """Trains for `minutes` of wall time (preprocessing included), then predicts and scores the test cases."""
    started = time.time()
    import numpy as np
    import torch
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss
    from monai.transforms import RandCropByPosNegLabeld

    from crossmodalseg.data.io import Geometry, from_array, read_image
    from crossmodalseg.engine.inferer import back_to_grid

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    items = [plain_preprocess(f, modalities, True) for f in train]
    crop = RandCropByPosNegLabeld(keys=["image", "label"], label_key="label", spatial_size=PLAIN_PATCH, pos=1,
                                  neg=1, num_samples=PLAIN_BATCH)
    crop.set_random_state(seed=seed)
    net = plain_network(len(modalities))
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    deadline = started + minutes * 60
    iterations = 0
    net.train()
    while time.time() < deadline:
        item = items[int(rng.integers(len(items)))]
        patches = crop({"image": item["image"], "label": item["label"]})
        x = torch.stack([torch.as_tensor(np.asarray(p["image"])) for p in patches])
        y = torch.stack([torch.as_tensor(np.asarray(p["label"])) for p in patches])
        loss = loss_fn(net(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        iterations += 1
    train_s = time.time() - started

    net.eval()
    scores = {}
    with torch.no_grad():
        for folder in test:
            item = plain_preprocess(folder, modalities, False)
            logits = sliding_window_inference(torch.as_tensor(item["image"])[None], PLAIN_PATCH, 4, net,
                                              overlap=0.25)
            probabilities = torch.softmax(logits[0], 0)
            target = read_image(folder / FILES[modalities[0]])
            index = back_to_grid(probabilities, Geometry.of(item["grid"]), Geometry.of(target))
            scores[folder.name] = score_prediction(from_array(index.astype(np.uint8), target), folder)
    return {"iterations": iterations, "train_wall_s": round(train_s, 1), "scores": scores}


# ---- the product -------------------------------------------------------------------------------------------------
def product_run(train: list[Path], test: list[Path], modalities: list[str], minutes: float, seed: int,
                work: Path, tta: bool = False) -> dict:
    from crossmodalseg.engine.checkpoint import read_model_meta
    from crossmodalseg.engine.inferer import Predictor

    data = write_dataset(work / "data", train, modalities)
    model = work / "model"
    command = [sys.executable, "-m", "crossmodalseg.cli", "train", str(data), "--method", "single", "--target",
               modalities[0], *[a for m in modalities[1:] for a in ("--assistant", m)], "--minutes", str(minutes),
               "--seed", str(seed), "--device", "cpu", "--out", str(model), "--json-events"]
    started = time.time()
    run = subprocess.run(command, capture_output=True, text=True)
    wall = time.time() - started
    if run.returncode != 0:
        raise RuntimeError(f"product training failed:\n{run.stderr[-3000:]}")
    meta = read_model_meta(model)
    predictor = Predictor(model, device="cpu")
    scores = {f.name: score_prediction(predictor.predict({m: f / FILES[m] for m in modalities}).label, f)
              for f in test}
    result = {"iterations": meta["training"]["iterations"], "train_wall_s": round(wall, 1), "scores": scores,
              "val_dice": meta["training"].get("val_dice"), "val_on": meta["training"].get("val_on")}
    if tta:  # the same model with 8-fold mirroring at test time: does it help at all?
        mirrored = Predictor(model, device="cpu", tta=True)
        result["scores_tta"] = {f.name: score_prediction(mirrored.predict({m: f / FILES[m] for m in modalities})
                                                         .label, f) for f in test}
    return result


# ---- the comparison ----------------------------------------------------------------------------------------------
def run_value(run: dict, region: str) -> float:
    """One value per run: the mean Dice over its held-out cases (a case whose reference and prediction are both
    empty, None, is left out)."""
    return statistics.mean(v for v in (s[region] for s in run["scores"].values()) if v is not None)


def summarise(runs: list[dict]) -> list[dict]:
    rows = []
    for recipe in ("product", "plain"):
        for minutes in sorted({r["minutes"] for r in runs}):
            chosen = [r for r in runs if r["recipe"] == recipe and r["minutes"] == minutes]
            if not chosen:
                continue
            row = {"recipe": recipe, "minutes": minutes, "runs": len(chosen),
                   "wall_s_max": max(r["train_wall_s"] for r in chosen),
                   "iterations_mean": round(statistics.mean(r["iterations"] for r in chosen), 1)}
            for region in REGIONS:
                values = [run_value(r, region) for r in chosen]
                row[region] = round(statistics.mean(values), 3)
                row[f"{region}_sd"] = round(statistics.stdev(values), 3) if len(values) > 1 else 0.0
            rows.append(row)
    return rows


def paired(runs: list[dict]) -> list[dict]:
    """Product minus plain per budget, over the (fold, seed) pairs that ran both: mean and sd of the differences,
    how many the product wins, and whether the mean is larger than the spread (the benchmark's rule for a result)."""
    by_key = {(r["recipe"], r["minutes"], r["fold"], r["seed"]): r for r in runs}
    rows = []
    for minutes in sorted({r["minutes"] for r in runs}):
        keys = sorted({(fold, seed) for recipe, m, fold, seed in by_key if m == minutes})
        both = [(by_key[("product", minutes, *k)], by_key[("plain", minutes, *k)]) for k in keys
                if ("product", minutes, *k) in by_key and ("plain", minutes, *k) in by_key]
        if not both:
            continue
        row = {"minutes": minutes, "pairs": 0}
        for region in REGIONS:
            add_paired(row, region, [(run_value(a, region), run_value(b, region)) for a, b in both])
        rows.append(row)
    return rows


def tta_effect(runs: list[dict]) -> dict:
    """Mean Dice per region with and without mirroring, over the product runs that were scored both ways."""
    both = [r for r in runs if r.get("scores_tta")]
    out = {"runs": len(both)}
    for region in REGIONS:
        for key, label in (("scores", "plain"), ("scores_tta", "mirrored")):
            values = [s[region] for r in both for s in r[key].values() if s[region] is not None]
            out[f"{region}_{label}"] = round(statistics.mean(values), 4) if values else None
    return out


def markdown(rows: list[dict], pairs: list[dict]) -> str:
    lines = ["| recipe | minutes | runs | iterations (mean) | max wall s | WT | TC | ET |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = [f"{r[g]:.3f} ± {r[g + '_sd']:.3f}" for g in REGIONS]
        lines.append(f"| {r['recipe']} | {r['minutes']:g} | {r['runs']} | {r['iterations_mean']:g} | "
                     f"{r['wall_s_max']:.0f} | " + " | ".join(cells) + " |")
    if pairs:
        lines += ["", "Product minus plain, paired by (fold, seed): mean ± sd of the differences (product wins / pairs)",
                  "", "| minutes | pairs | WT | TC | ET |", "|---|---|---|---|---|"]
        for p in pairs:
            cells = [f"{p[g]:+.3f} ± {p[g + '_sd']:.3f} ({p[g + '_wins']}/{p['pairs']})"
                     + (" beyond spread" if p[f"{g}_beyond_spread"] else "") for g in REGIONS]
            lines.append(f"| {p['minutes']:g} | {p['pairs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, nargs="+", default=[2, 4, 8])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--only-fold", type=int, nargs="+", help="run only these folds (for a quick look)")
    parser.add_argument("--recipes", nargs="+", default=["product", "plain"], choices=["product", "plain"])
    parser.add_argument("--modalities", nargs="+", default=["flair", "t1c"], choices=list(FILES))
    parser.add_argument("--tta-at", type=float, nargs="*", default=[],
                        help="budgets (minutes) at which the product's models are also scored with mirroring")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    folders = case_folders()
    folds = folds_of(folders, args.folds)
    runs: list[dict] = []
    if args.out.exists():  # a run that was interrupted goes on where it stopped
        runs = json.loads(args.out.read_text()).get("runs", [])
    done = {(r["recipe"], r["fold"], r["seed"], r["minutes"]) for r in runs}
    order = 0
    for minutes in args.minutes:
        for seed in args.seeds:
            for k, test in enumerate(folds):
                if args.only_fold and k not in args.only_fold:
                    continue
                train = [f for f in folders if f not in test]
                recipes = args.recipes if order % 2 == 0 else list(reversed(args.recipes))
                order += 1
                for recipe in recipes:
                    if (recipe, k, seed, minutes) in done:
                        continue
                    with tempfile.TemporaryDirectory(prefix="cms-recipe-") as tmp:
                        if recipe == "product":
                            result = product_run(train, test, args.modalities, minutes, seed, Path(tmp),
                                                 tta=minutes in args.tta_at)
                        else:
                            result = plain_in_subprocess(train, test, args.modalities, minutes, seed)
                    runs.append({"recipe": recipe, "fold": k, "seed": seed, "minutes": minutes,
                                 "train": [f.name for f in train], "test": [f.name for f in test], **result})
                    print(json.dumps(runs[-1]), flush=True)
                    write(args, runs)
    write(args, runs)
    print(markdown(summarise(runs), paired(runs)))


def plain_in_subprocess(train: list[Path], test: list[Path], modalities: list[str], minutes: float,
                        seed: int) -> dict:
    """The plain recipe in a fresh process, as the product runs in one (same start-up costs, same memory state)."""
    request = json.dumps({"train": [str(f) for f in train], "test": [str(f) for f in test],
                          "modalities": modalities, "minutes": minutes, "seed": seed})
    run = subprocess.run([sys.executable, __file__, "plain", request], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"plain recipe failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def write(args: argparse.Namespace, runs: list[dict]) -> None:
    import torch

    rows, pairs = (summarise(runs), paired(runs)) if runs else ([], [])
    args.out.write_text(json.dumps({
        "what": "product `single` vs a plain MONAI recipe at equal wall time, BraTS 2015 FLAIR+T1c, CPU",
        "command": " ".join(sys.argv), "modalities": args.modalities, "folds": args.folds,
        "machine": {"python": platform.python_version(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "processor": platform.processor() or platform.machine()},
        "summary": rows, "paired": pairs, "markdown": markdown(rows, pairs) if rows else "", "tta": tta_effect(runs), "runs": runs},
        indent=1))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "plain":
        spec = json.loads(sys.argv[2])
        result = plain_run([Path(p) for p in spec["train"]], [Path(p) for p in spec["test"]], spec["modalities"],
                           spec["minutes"], spec["seed"])
        print(json.dumps(result))
    else:
        main()
