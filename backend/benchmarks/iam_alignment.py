"""How well MKD's image alignment modules make MR look like CT, and how many translator iterations that takes.

The measure issue 10 asks for: a CT segmentor's Dice on aligned MR images (it only ever saw CT, so the more CT-like
the MR, the higher). On the learning tests' tiny phantom (`phantom_methods.py`'s geometry):
1. `single` is trained on the CT of 6 patients (300 iterations, the tests' budget): the judge.
2. MKD's CycleGAN translators train alone (its `translator_phase`), on unpaired CT (1 patient) and MR (5 other
   patients), the MKD scenario of `phantom_methods.py`, at a constant learning rate.
3. Every `--eval-every` iterations the judge segments the MR of 3 held-out patients as they are, histogram-matched
   (`iam=histogram`) and translated by the CycleGAN so far; mean Dice of liver, kidney, spleen against their labels.
The judge's Dice on the same patients' CT is the ceiling. One JSON line per evaluation on stdout and in `--out`.

    python backend/benchmarks/iam_alignment.py --iterations 1500 --out iam_alignment.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TRANSLATOR = {"translator_filters": 16, "translator_blocks": 3}  # the product's defaults, stated


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1500, help="translator iterations")
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--dims", type=int, choices=[2, 3], default=3, help="3D translators, or 2D on axial slices")
    parser.add_argument("--gan-lr", type=float, default=2e-4, help="the translators' learning rate (constant)")
    parser.add_argument("--cycle-weight", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="append one JSON line per evaluation")
    args = parser.parse_args(argv)

    import torch
    from phantom_methods import EPOCHS, ITERATIONS, SIZE, SPACING, only

    from crossmodalseg.data.phantom import make_phantom_dataset
    from crossmodalseg.data.plan import Normalisation
    from crossmodalseg.data.spec import DatasetSpec
    from crossmodalseg.data.transforms import LoadCased
    from crossmodalseg.engine.checkpoint import load_weights, read_model_meta
    from crossmodalseg.engine.inferer import build_method, predict_probabilities
    from crossmodalseg.engine.trainer import TrainConfig, train
    from crossmodalseg.methods import StepContext, Task, get_method
    from crossmodalseg.methods.mkd import translate

    torch.manual_seed(args.seed)
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="iam_alignment_") as tmp:
        root = Path(tmp)
        paired = make_phantom_dataset(root / "paired", n_cases=6, seed=5, size=SIZE, spacing=SPACING)
        unpaired = make_phantom_dataset(root / "unpaired", n_cases=12, seed=6, size=SIZE, spacing=SPACING,
                                        paired=False)
        held_out = make_phantom_dataset(root / "held_out", n_cases=3, seed=50, size=SIZE, spacing=SPACING)
        ct_cases = DatasetSpec("ct6", paired.labels, {"ct": "CT"}, [only(c, ["ct"]) for c in paired.cases],
                               root / "ct6")
        ct_cases.save()
        started = time.time()
        judge_dir = train(ct_cases.root, root / "judge", TrainConfig(
            method="single", target="ct", epochs=EPOCHS, iterations_per_epoch=ITERATIONS, device="cpu",
            val_every=EPOCHS, seed=args.seed))
        judge = build_method(read_model_meta(judge_dir))
        load_weights(judge_dir, judge.nets)
        judge_s = time.time() - started

        # MKD on the judge's plan, so CT is normalised as the judge saw it (MR: per image, as always)
        plan = judge.plan
        plan.normalisation["mr"] = Normalisation("mr", "MR")
        ct, mr = unpaired.cases_with("ct"), unpaired.cases_with("mr")
        spec = DatasetSpec("mkd", unpaired.labels, unpaired.modalities, [ct[0], *mr[:5]], unpaired.root)
        task = Task.from_spec(spec, "ct", ["mr"])
        # the translators' phase as MKD runs it (translator_step without segmentation), here at a constant rate
        options = {"iam": "cyclegan", "translator_phase": 0.5, "translator_dims": args.dims,
                   "gan_learning_rate": args.gan_lr, "cycle_weight": args.cycle_weight, **TRANSLATOR}
        mkd = get_method("mkd")(task, plan, options)
        histogram = get_method("mkd")(task, plan, {"iam": "histogram"})
        items = {name: [LoadCased(s.modalities, plan, task)({"case": c}) for c in s.cases]
                 for name, s in mkd.streams(spec).items()}
        histogram.prepare(items, fresh=True)

        def held(modality: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
            load = LoadCased([modality], plan, task)
            return [(torch.as_tensor(it["image"])[None], torch.as_tensor(it["label"])[None])
                    for it in (load({"case": c}) for c in held_out.cases)]

        held_mr, held_ct = held("mr"), held("ct")

        def judge_dice(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
            """The judge's mean Dice (liver, kidney, spleen; mean over patients) on these images."""
            from crossmodalseg.methods.mkd import hard_dice

            scores = []
            for image, label in pairs:
                probs = predict_probabilities(judge, image[0], ["ct"], cpu, amp_dtype=None)["unet"]
                scores.append(hard_dice(probs[None], label))
            return round(float(np.mean(scores)), 4)

        fixed = {"judge on held-out CT (ceiling)": judge_dice(held_ct), "raw MR": judge_dice(held_mr),
                 "histogram-matched MR": judge_dice(
                     [(histogram.align(x, y), y) for x, y in held_mr])}
        print(json.dumps({"judge_train_s": round(judge_s, 1), **fixed}), flush=True)

        ctx = StepContext(cpu, None, torch.amp.GradScaler("cpu", enabled=False))
        stream = mkd.batches(items, seed=args.seed, device=cpu)
        mkd.train_mode(True)
        started, done = time.time(), 0
        while done < args.iterations:
            for _ in range(args.eval_every):
                batch = next(stream)
                logs, _ = mkd.translator_step(batch["x_t"], batch["x_a"], batch["y_a"], ctx, segmentation=False)
                done += 1
            mkd.train_mode(False)
            with torch.no_grad():
                translated = [(translate(mkd.nets["g_a2t"], x, args.dims), y) for x, y in held_mr]
            mkd.train_mode(True)
            row = {"dims": args.dims, "gan_lr": args.gan_lr, "cycle_weight": args.cycle_weight, "seed": args.seed,
                   "iterations": done, "translator_s": round(time.time() - started, 1),
                   "judge on CycleGAN-translated MR": judge_dice(translated), **fixed,
                   **{k: round(v, 4) for k, v in logs.items()}}
            print(json.dumps(row), flush=True)
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
