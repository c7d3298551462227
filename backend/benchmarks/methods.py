"""Methods benchmark on real brain MRI: BraTS 2015 FLAIR + T1c (4 labelled cases) and the unlabelled BraTS 2023 case.

Every experiment uses one network preset and one training budget; Dice of the BraTS regions (whole tumour WT,
tumour core TC, enhancing tumour ET) on the held-out patient(s). Writes JSON and a Markdown table.

    python backend/benchmarks/methods.py --mode cpu --out backend/benchmarks/methods_cpu.json
    python backend/benchmarks/methods.py --mode full --device cuda --out methods_gpu.json     # on a GPU

Experiments (train on pat0003-0005 unless said, test on pat0006):
- `single` early fusion (FLAIR+T1c), `single` FLAIR only, `single` T1c only;
- `maml` (FLAIR+T1c), predicted with both, with FLAIR missing and with T1c missing;
- `mkd` unpaired: T1c target with labels of pat0003 only, FLAIR of pat0004-0005 as assistant; against `single` T1c on
  pat0003 alone; ablations no IAM (`iam=none`) and no KD (`kd_a2t=kd_t2a=0`);
- `cmc`: pat0003 labelled + pat0004, pat0005 and BraTS 2023 unlabelled, against the same network supervised-only.
Modes: `cpu` resamples to 3 mm and trains 200 iterations per experiment; `full` keeps 1 mm (preset `full`) and
trains 1000 iterations.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3] / "shared" / "data"
BRATS = ROOT / "brats2015_flair_t1c"
BRATS_2023 = ROOT / "brats2023_gli_unlabelled"
LABELS = {"background": 0, "necrosis": 1, "edema": 2, "non-enhancing": 3, "enhancing": 4}
REGIONS = {"WT": [1, 2, 3, 4], "TC": [1, 3, 4], "ET": [4]}
TRAIN, TEST = ["brats_2013_pat0003_1", "brats_2013_pat0004_1", "brats_2013_pat0005_1"], ["brats_2013_pat0006_1"]
MODES = {"cpu": {"spacing": 3.0, "preset": "fast", "epochs": 8, "iterations": 25},
         "full": {"spacing": 1.0, "preset": "full", "epochs": 10, "iterations": 100}}


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
    for case in TRAIN + TEST:
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

    cases = [Case(c, {m: files[c][m] for m in images}, {m: files[c]["seg"] for m in labels})
             for c, images, labels in entries]
    spec = DatasetSpec(name, LABELS, {"flair": "MR", "t1c": "MR"}, cases, root / name)
    spec.save()
    return spec.root


def run(args: argparse.Namespace) -> dict:
    from crossmodalseg.engine.trainer import TrainConfig, software_versions, train

    mode = MODES[args.mode]
    work = Path(tempfile.mkdtemp(prefix="cms-methods-"))
    files = prepare(work / "images", mode["spacing"])
    both = ["flair", "t1c"]
    test_set = dataset(work, "test", [(c, both, ["flair", "t1c"]) for c in TEST], files)
    paired = dataset(work, "paired", [(c, both, ["flair"]) for c in TRAIN], files)
    unpaired = dataset(work, "unpaired", [(TRAIN[0], ["t1c"], ["t1c"])] + [(c, ["flair"], ["flair"]) for c in TRAIN[1:]],
                       files)
    t1c_one = dataset(work, "t1c_one", [(TRAIN[0], ["t1c"], ["t1c"])], files)
    semi = dataset(work, "semi", [(TRAIN[0], both, ["flair", "t1c"])] + [(c, both, []) for c in TRAIN[1:]]
                   + [("brats2023", both, [])], files)
    one_labelled = dataset(work, "one_labelled", [(TRAIN[0], both, ["flair", "t1c"])], files)

    experiments = [
        # name, dataset, method, target, assistants, hparams, inputs at test time
        ("single FLAIR+T1c (early fusion)", paired, "single", "flair", ["t1c"], {}, both),
        ("single FLAIR", paired, "single", "flair", [], {}, ["flair"]),
        ("single T1c", paired, "single", "t1c", [], {}, ["t1c"]),
        ("maml FLAIR+T1c", paired, "maml", "flair", ["t1c"], {}, both),
        ("mkd T1c target + FLAIR assistant (unpaired)", unpaired, "mkd", "t1c", ["flair"], {}, ["t1c"]),
        ("mkd, no IAM", unpaired, "mkd", "t1c", ["flair"], {"iam": "none"}, ["t1c"]),
        ("mkd, no KD", unpaired, "mkd", "t1c", ["flair"], {"kd_a2t": 0.0, "kd_t2a": 0.0}, ["t1c"]),
        ("single T1c, same T1c labels as mkd (1 case)", t1c_one, "single", "t1c", [], {}, ["t1c"]),
        ("cmc 1 labelled + 3 unlabelled", semi, "cmc", "t1c", ["flair"], {}, both),
        ("cmc supervised-only (same labelled case)", one_labelled, "cmc", "t1c", ["flair"],
         {"csc_weight": 0.0, "cac_weight": 0.0}, both),
    ]
    if args.only:
        experiments = [e for e in experiments if any(o in e[0] for o in args.only)]
    results = []
    for name, data, method, target, assistants, hparams, inputs in experiments:
        print(f"[methods] {name}", file=sys.stderr, flush=True)
        config = TrainConfig(method=method, target=target, assistants=assistants, preset=mode["preset"],
                             epochs=mode["epochs"], iterations_per_epoch=mode["iterations"], device=args.device,
                             val_every=mode["epochs"], seed=args.seed, options=hparams)
        started = time.time()
        model = train(data, work / "models" / f"m{len(results)}", config)
        seconds = time.time() - started
        rows = {"with " + "+".join(inputs): score(model, test_set, inputs, args.device)}
        if method == "maml":
            rows["FLAIR missing (T1c only)"] = score(model, test_set, ["t1c"], args.device)
            rows["T1c missing (FLAIR only)"] = score(model, test_set, ["flair"], args.device)
        for variant, per_case in rows.items():
            results.append({"experiment": name, "inputs": variant, "method": method, "hparams": hparams,
                            "train_seconds": round(seconds, 1), "dice": per_case})
    return {"benchmark": "methods", "mode": args.mode, "budget": mode, "device": args.device,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "software": software_versions(),
            "machine": platform.machine(), "train_cases": TRAIN, "test_cases": TEST, "results": results}


def score(model: Path, test_set: Path, inputs: list[str], device: str) -> dict[str, dict[str, float | None]]:
    """Region Dice per test case, predicting from `inputs` only; the label is the case's (shared) segmentation."""
    import numpy as np

    from crossmodalseg.data.io import read_image, to_array
    from crossmodalseg.data.spec import load_spec
    from crossmodalseg.data.transforms import values_to_indices
    from crossmodalseg.engine.evaluate import score as score_maps
    from crossmodalseg.engine.inferer import Predictor

    predictor = Predictor(model, device=device)
    out = {}
    for case in load_spec(test_set).cases:
        result = predictor.predict({m: case.images[m] for m in inputs})
        reference = values_to_indices(to_array(read_image(case.labels["flair"]), np.float64), list(LABELS.values()))
        predicted = values_to_indices(to_array(result.label, np.float64), list(LABELS.values()))
        spacing = list(read_image(case.images[inputs[0]]).GetSpacing())[::-1]
        scores = score_maps(predicted, reference, [], spacing, REGIONS)
        out[case.id] = {r: scores[r]["dice"] for r in REGIONS}
    return out


def markdown(report: dict) -> str:
    lines = [f"Mode `{report['mode']}` ({report['budget']}), device `{report['device']}`, train "
             f"{', '.join(report['train_cases'])}, test {', '.join(report['test_cases'])}.", "",
             "| experiment | inputs | case | WT | TC | ET | train s |", "|---|---|---|---|---|---|---|"]
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    for r in report["results"]:
        for case, d in r["dice"].items():
            lines.append(f"| {r['experiment']} | {r['inputs']} | {case} | {fmt(d['WT'])} | {fmt(d['TC'])} | "
                         f"{fmt(d['ET'])} | {r['train_seconds']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=list(MODES), default="cpu")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", help="run experiments whose name contains one of these")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    report = run(args)
    table = markdown(report)
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
