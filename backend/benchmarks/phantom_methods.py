"""Each method against the baseline it exists to beat, on the phantom, at the learning tests' budget.

The phantom counterpart of `methods.py`: the tiny phantom of the learning tests (40 x 40 x 24 voxels of 4.5 x 4.5 x 6
mm, CT and MR of one synthetic anatomy, liver/kidney/spleen), 12 epochs x 25 iterations per run (the tests' budget),
the product's defaults otherwise, every model scored on the same 3 held-out patients (a phantom seed never trained
on), ensembles also member by member. Where both modalities show every structure, which BraTS sub-regions do not:
- `mkd`: 1 labelled CT case + 5 labelled MR cases of other patients (unpaired) against `single` CT on that case;
- `maml`: 3 labelled CT+MR pairs against `single` early fusion on the same pairs;
- `cmc`: 1 labelled pair + 5 unlabelled pairs against CMC without its consistency terms on the labelled pair, and
  against `single` early fusion on it.
One JSON line per run on stdout and in `--out`; the runs are deterministic on a given CPU.

    python backend/benchmarks/phantom_methods.py --seeds 0 1 --out phantom_methods.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

SIZE, SPACING = (40, 40, 24), (4.5, 4.5, 6.0)  # the learning tests' tiny phantom (MAML's; tests/learning.py)
COARSE_SIZE, COARSE_SPACING = (32, 32, 20), (5.625, 5.625, 7.2)  # MKD's and CMC's (tests/learning.py)
EPOCHS, ITERATIONS = 12, 25
# comparison: [(method, dataset, target, assistants, options)], the method first, then its baselines
COMPARISONS = {
    "mkd": [("mkd", "mkd_ct", "ct", ["mr"], {}), ("single", "ct_one", "ct", [], {})],
    "mkd histogram": [("mkd", "mkd_ct", "ct", ["mr"], {"iam": "histogram"})],
    # ablation: seg_target also distils into seg_assistant on the target images both are ensembled on
    "mkd, KD t->a on target": [("mkd", "mkd_ct", "ct", ["mr"], {"kd_t2a_target": 1.0})],
    "mkd histogram, KD t->a on target": [("mkd", "mkd_ct", "ct", ["mr"], {"iam": "histogram", "kd_t2a_target": 1.0})],
    # the learned IAM: as published (translators and segmentors every iteration), or the translators first, alone,
    # in their own share of the budget (3D or 2D slices), then frozen
    "mkd cyclegan": [("mkd", "mkd_ct", "ct", ["mr"], {"iam": "cyclegan"})],
    "mkd cyclegan, translator phase": [("mkd", "mkd_ct", "ct", ["mr"], {"iam": "cyclegan", "translator_phase": 0.3})],
    "mkd cyclegan 2D, translator phase": [("mkd", "mkd_ct", "ct", ["mr"], {"iam": "cyclegan", "translator_phase": 0.3,
                                                                           "translator_dims": 2})],
    "mkd cyclegan, translator phase, GAN lr 1e-3": [("mkd", "mkd_ct", "ct", ["mr"], {
        "iam": "cyclegan", "translator_phase": 0.3, "gan_learning_rate": 1e-3})],
    "maml": [("maml", "paired3", "ct", ["mr"], {}), ("single", "paired3", "ct", ["mr"], {})],
    "cmc": [("cmc", "semi", "ct", ["mr"], {}), ("cmc", "one", "ct", ["mr"], {"csc_weight": 0.0, "cac_weight": 0.0}),
            ("single", "one", "ct", ["mr"], {})],
}


def only(case: Any, modalities: list[str], labelled: bool = True) -> Any:
    """The case with these modalities' images (and labels, unless `labelled` is False) alone."""
    from crossmodalseg.data.spec import Case

    return Case(case.id, {m: case.images[m] for m in modalities},
                {m: case.labels[m] for m in modalities} if labelled else {}, co_registered=len(modalities) > 1)


def held_out_set(held_out: Any, modalities: list[str]) -> Any:
    """The held-out phantom dataset reduced to these modalities (images and labels), as a spec to evaluate on."""
    from crossmodalseg.data.spec import DatasetSpec

    return DatasetSpec("held-out", held_out.labels, {m: held_out.modalities[m] for m in modalities},
                       [only(c, modalities) for c in held_out.cases], held_out.root)


def datasets(root: Path) -> tuple[dict[str, Path], Callable[[list[str]], Any]]:
    """Writes the phantom datasets under `root`: {name: dataset folder} and test(modalities) -> held-out spec."""
    from crossmodalseg.data.phantom import make_phantom_dataset
    from crossmodalseg.data.spec import DatasetSpec

    paired = make_phantom_dataset(root / "paired", n_cases=6, seed=5, size=SIZE, spacing=SPACING)
    unpaired = make_phantom_dataset(root / "unpaired", n_cases=12, seed=6, size=SIZE, spacing=SPACING, paired=False)
    held_out = make_phantom_dataset(root / "held_out", n_cases=3, seed=50, size=SIZE, spacing=SPACING)

    def spec(name: str, cases: list) -> Path:
        s = DatasetSpec(name, paired.labels, paired.modalities, cases, root / "datasets" / name)
        s.save()
        return s.root

    ct, mr = unpaired.cases_with("ct"), unpaired.cases_with("mr")
    built = {"mkd_ct": spec("mkd_ct", [ct[0], *mr[:5]]), "ct_one": spec("ct_one", [ct[0]]),
             "paired3": spec("paired3", paired.cases[:3]),
             "semi": spec("semi", [paired.cases[0], *(only(c, ["ct", "mr"], False) for c in paired.cases[1:6])]),
             "one": spec("one", [paired.cases[0]])}

    return built, lambda modalities: held_out_set(held_out, modalities)


def train_and_score(dataset: Path, test_set: Any, method: str, target: str, assistants: list[str], options: dict,
                    seed: int, out: Path, batch_size: int | None = None) -> dict:
    """Trains one model at the learning tests' budget and scores it (and each ensemble member) on `test_set`: one
    JSON-ready row. `batch_size`: patches a step (default: the plan's)."""
    import torch

    from crossmodalseg.engine.evaluate import evaluate_model
    from crossmodalseg.engine.events import read_events
    from crossmodalseg.engine.trainer import TrainConfig, train

    config = TrainConfig(method=method, target=target, assistants=assistants, epochs=EPOCHS,
                         iterations_per_epoch=ITERATIONS, batch_size=batch_size, device="cpu", val_every=EPOCHS,
                         seed=seed, options=options)
    started = time.time()
    model = train(dataset, out, config)
    seconds = time.time() - started
    results = evaluate_model(model, test_set, device="cpu", members=True)
    last = [e for e in read_events(model / "events.jsonl") if e["event"] == "epoch"][-1]
    row = {"method": method, "dataset": dataset.name, "options": options, "seed": seed, "batch_size": batch_size,
           "torch_threads": torch.get_num_threads(), "train_seconds": round(seconds, 1),
           "dice": {k: round(v["dice"], 3) for k, v in results["mean"].items()},
           "members": {m: {k: round(v["dice"], 3) for k, v in r["mean"].items()}
                       for m, r in results.get("members", {}).items()},
           "training_set_dice": last.get("val_dice"),
           "alignment_dice": last.get("alignment_dice")}  # MKD: seg_target on aligned assistant
    row["mean_dice"] = round(float(np.mean(list(row["dice"].values()))), 3)
    return row


def emit(row: dict, out: Path | None) -> None:
    """Prints one run's row and appends it to the JSON-lines file `out`."""
    print(json.dumps(row), flush=True)
    if out:
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")


def add_threads_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core); the learning "
                        "tests train at 1 (backend/tests/learning.py)")


def set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--only", nargs="*", choices=list(COMPARISONS), help="comparisons to run (default: all)")
    parser.add_argument("--out", type=Path, help="append one JSON line per run")
    add_threads_option(parser)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="phantom_methods_") as tmp:
        work = Path(tmp)
        data, test = datasets(work)
        for name in args.only or list(COMPARISONS):
            for seed in args.seeds:
                for index, (method, dataset, target, assistants, options) in enumerate(COMPARISONS[name]):
                    row = {"comparison": name, **train_and_score(data[dataset], test([target, *assistants]), method,
                                                                 target, assistants, options, seed,
                                                                 work / "models" / f"{name}_{seed}_{index}")}
                    emit(row, args.out)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
