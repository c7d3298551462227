"""MAML and MKD against their baselines in the learning tests' own scenarios, over several seeds: the measurements
behind the margins of `test_methods.py`'s comparison tests.

The datasets of `test_methods.py`'s fixtures, rebuilt here (same phantom seeds and sizes):
- `paired`: 10 co-registered CT+MR phantom patients (seed 3), case008 and case009 held out; `maml` on the other 8
  against `single` early fusion on them;
- `unpaired`: 6 CT and 6 MR patients, all different (seed 4), held-out CT of 2 other patients (seed 40); `mkd` (CT
  target, MR assistant, histogram alignment as in its learning test) against `single` CT on the 6 CT cases; also
  with option `kd_t2a_target`; and MKD with MR as the target, scored on the same 2 patients' MR.
The learning tests' budget (12 x 25 iterations, `phantom_methods.py`), every model and member scored on the held-out
cases; one JSON line per run.

    python backend/benchmarks/phantom_test_scenarios.py --seeds 0 1 2 --out phantom_test_scenarios.jsonl

The tests train at one torch thread (backend/tests/learning.py): `--threads 1` measures what they see. Since
2026-12-08 they train 2 patches a step (`--batch-size 2`), and MKD's scenarios are on the coarser phantom
(`--grid coarse`, 32 x 32 x 20 voxels; `fine` is 40 x 40 x 24, MAML's).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from pathlib import Path

from phantom_methods import (
    COARSE_SIZE,
    COARSE_SPACING,
    SIZE,
    SPACING,
    add_threads_option,
    emit,
    held_out_set,
    set_threads,
    train_and_score,
)

GRIDS = {"fine": (SIZE, SPACING), "coarse": (COARSE_SIZE, COARSE_SPACING)}  # tests/learning.py's two


def scenarios(root: Path, grid: str = "fine") -> dict[str, tuple[Path, object, str, str, list[str], dict]]:
    """{run name: (training set, held-out spec, method, target, assistants, options)} on the phantom `grid`."""
    size, spacing = GRIDS[grid]
    from crossmodalseg.data.phantom import make_phantom_dataset
    from crossmodalseg.data.spec import DatasetSpec

    def save(spec: DatasetSpec, name: str, cases: list, modalities: dict | None = None) -> DatasetSpec:
        made = DatasetSpec(name, spec.labels, modalities or spec.modalities, cases, root / name)
        made.save()
        return made

    paired = make_phantom_dataset(root / "paired_all", n_cases=10, seed=3, size=size, spacing=spacing)
    held_out_ids = {"case008", "case009"}
    paired_train = save(paired, "paired", [c for c in paired.cases if c.id not in held_out_ids]).root
    paired_test = save(paired, "paired_test", [c for c in paired.cases if c.id in held_out_ids])
    unpaired = make_phantom_dataset(root / "unpaired_all", n_cases=12, seed=4, size=size, spacing=spacing,
                                    paired=False)
    unpaired_train = save(unpaired, "unpaired", unpaired.cases).root
    ct_only = save(unpaired, "ct_only", unpaired.cases_with("ct"), {"ct": unpaired.modalities["ct"]}).root
    held = make_phantom_dataset(root / "held_out", n_cases=2, seed=40, size=size, spacing=spacing)
    held_ct = held_out_set(held, ["ct"])
    held_mr = held_out_set(held, ["mr"])
    return {"maml": (paired_train, paired_test, "maml", "ct", ["mr"], {}),
            "single early fusion": (paired_train, paired_test, "single", "ct", ["mr"], {}),
            "mkd histogram": (unpaired_train, held_ct, "mkd", "ct", ["mr"], {"iam": "histogram"}),
            # the option that has the assistant member learn CT images too (RESULTS.md: lifts the phantom ensemble)
            "mkd histogram, KD t->a on target": (unpaired_train, held_ct, "mkd", "ct", ["mr"],
                                                 {"iam": "histogram", "kd_t2a_target": 1.0}),
            "single CT": (ct_only, held_ct, "single", "ct", [], {}),
            # MR as the target (test_mkd_learns_with_mr_as_the_target_and_ct_as_the_assistant)
            "mkd MR target, histogram": (unpaired_train, held_mr, "mkd", "mr", ["ct"], {"iam": "histogram"}),
            "mkd MR target, histogram, KD t->a on target": (unpaired_train, held_mr, "mkd", "mr", ["ct"],
                                                            {"iam": "histogram", "kd_t2a_target": 1.0})}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, help="append one JSON line per run")
    parser.add_argument("--only", nargs="*", help="run only these (default: all)")
    parser.add_argument("--grid", choices=sorted(GRIDS), default="fine", help="the phantom's voxel grid")
    parser.add_argument("--batch-size", type=int, help="patches a step (default: the plan's)")
    add_threads_option(parser)
    args = parser.parse_args(argv)
    set_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="phantom_test_scenarios_") as tmp:
        work = Path(tmp)
        runs = scenarios(work / "data", args.grid)
        if unknown := set(args.only or []) - set(runs):
            raise SystemExit(f"unknown run(s) {sorted(unknown)}; choose from {list(runs)}")
        for seed in args.seeds:
            for name, (dataset, test_set, method, target, assistants, options) in runs.items():
                if args.only and name not in args.only:
                    continue
                model = work / "models" / re.sub(r"\W+", "_", f"{name}_{seed}")
                emit({"run": name, "grid": args.grid, **train_and_score(dataset, test_set, method, target, assistants,
                                                                        options, seed, model, args.batch_size)},
                     args.out)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
