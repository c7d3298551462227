"""Where does the plain recipe's accuracy come from? The plain MONAI recipe of bench_recipe.py with one ingredient
of the product swapped in, at a fixed number of iterations (so the answer is Dice per iteration, whatever else runs
on the machine; the time per iteration is measured separately). One line of JSON per run is appended to --out.

    python backend/benchmarks/ablate_recipe.py --fold 0 --iterations 1500 net=16-32-64-128 convs=1 --out runs.jsonl
    python backend/benchmarks/ablate_recipe.py --speed --out speed.json   # ms per training step and FLOPs

Ingredients (`key=value`, none: the plain recipe):
- `net=16-32-64` (the project's U-Net, first level strided, one level per filter; a fourth filter is an unstrided
  level on the coarsest grid), `convs=1|2` (convolutions per level, default 2);
- `loss=product` (DiceCE without background, batch Dice), `sampler=classes fg=0.8` (class-balanced patch centres),
  `amp=bf16`, `sched=poly lr=2e-3`, `norm=fg` (z-score inside the brain), `norm=fg0` (the same, background set to
  0), `spacing=1.9522`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_recipe as recipe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fold", type=int, default=0, help="0 or 1: which 2 of the 4 cases are held out")
    parser.add_argument("--speed", action="store_true", help="time a training step of each network instead")
    parser.add_argument("--iterations", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("knobs", nargs="*", help="key=value ingredients (see the module docstring)")
    args = parser.parse_args()
    knobs = dict(k.split("=", 1) for k in args.knobs)
    record = step_times() if args.speed else run(args.fold, args.iterations, args.seed, knobs)
    print(json.dumps(record))
    with args.out.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def run(fold: int, iterations: int, seed: int, knobs: dict[str, str]) -> dict:
    from monai.inferers import sliding_window_inference
    from monai.losses import DiceCELoss
    from monai.transforms import NormalizeIntensity, RandCropByLabelClassesd, RandCropByPosNegLabeld

    from crossmodalseg.data.geometry import resample_to_spacing
    from crossmodalseg.data.io import Geometry, from_array, read_image, to_array
    from crossmodalseg.data.plan import foreground_mask
    from crossmodalseg.data.transforms import class_ratios
    from crossmodalseg.engine.inferer import back_to_grid
    from crossmodalseg.nets.unet import UNet, UNetConfig

    folders = recipe.case_folders()
    test = folders[fold::2]
    train = [f for f in folders if f not in test]
    modalities = ["flair", "t1c"]
    spacing = float(knobs.get("spacing", recipe.PLAIN_SPACING))
    classes = len(recipe.LABELS)

    def prepare(folder: Path, with_label: bool) -> dict:
        images = [resample_to_spacing(read_image(folder / recipe.FILES[m]), (spacing,) * 3) for m in modalities]
        if knobs.get("norm") in ("fg", "fg0"):  # z-score inside the brain (the product's MR scheme before)
            arrays = [to_array(i) for i in images]
            masks = [foreground_mask(a) for a in arrays]
            scored = [(a - a[m].mean()) / max(float(a[m].std()), 1e-6) for a, m in zip(arrays, masks)]
            if knobs["norm"] == "fg0":  # ... with the background set to 0 (nnU-Net's masked z-score)
                scored = [np.where(m, z, 0.0) for m, z in zip(masks, scored)]
            stacked = np.stack(scored)
        else:
            stacked = np.asarray(NormalizeIntensity(channel_wise=True)(np.stack([to_array(i) for i in images])))
        out = {"image": stacked.astype(np.float32), "grid": images[0]}
        if with_label:  # BraTS label values are 0..4: class indices as they are
            label = resample_to_spacing(read_image(folder / recipe.LABEL_FILE), (spacing,) * 3, "nearest")
            out["label"] = to_array(label, np.int64)[None]
        return out

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    items = [prepare(f, True) for f in train]
    keys = ["image", "label"]
    if knobs.get("sampler") == "classes":
        crop = RandCropByLabelClassesd(keys=keys, label_key="label", spatial_size=recipe.PLAIN_PATCH,
                                       ratios=class_ratios(classes, float(knobs.get("fg", 0.8))),
                                       num_classes=classes, num_samples=recipe.PLAIN_BATCH, warn=False)
    else:
        crop = RandCropByPosNegLabeld(keys=keys, label_key="label", spatial_size=recipe.PLAIN_PATCH, pos=1, neg=1,
                                      num_samples=recipe.PLAIN_BATCH)
    crop.set_random_state(seed=seed)
    if "net" in knobs:
        filters = [int(v) for v in knobs["net"].split("-")]
        strides = [[2, 2, 2]] * 3 + [[1, 1, 1]] * (len(filters) - 3)
        net = UNet(UNetConfig(len(modalities), classes, filters, strides, [[3, 3, 3]] * len(filters),
                              int(knobs.get("convs", 2))))
    else:
        net = recipe.plain_network(len(modalities))
    lr = float(knobs.get("lr", 1e-3))
    optimizer = torch.optim.AdamW(net.parameters(), lr=lr)
    if knobs.get("loss") == "product":
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, smooth_nr=1e-5,
                             smooth_dr=1e-5, batch=True)
    else:
        loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    amp = torch.bfloat16 if knobs.get("amp") == "bf16" else None

    started = time.time()
    net.train()
    for it in range(iterations):
        if knobs.get("sched") == "poly":
            for group in optimizer.param_groups:
                group["lr"] = lr * (1 - it / iterations) ** 0.9
        item = items[int(rng.integers(len(items)))]
        patches = crop({"image": item["image"], "label": item["label"]})
        x = torch.stack([torch.as_tensor(np.asarray(p["image"])) for p in patches])
        y = torch.stack([torch.as_tensor(np.asarray(p["label"])) for p in patches])
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            out = net(x)
        loss = loss_fn(out.float(), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    train_s = time.time() - started

    net.eval()
    scores = {}
    with torch.no_grad():
        for folder in test:
            item = prepare(folder, False)
            logits = sliding_window_inference(torch.as_tensor(item["image"])[None], recipe.PLAIN_PATCH, 4, net,
                                              overlap=0.25)
            target = read_image(folder / recipe.FILES[modalities[0]])
            index = back_to_grid(torch.softmax(logits[0], 0), Geometry.of(item["grid"]), Geometry.of(target))
            scores[folder.name] = recipe.score_prediction(from_array(index.astype(np.uint8), target), folder)
    mean = {r: round(float(np.mean([s[r] for s in scores.values()])), 3) for r in recipe.REGIONS}
    return {"knobs": knobs, "fold": fold, "seed": seed, "iterations": iterations, "train_s": round(train_s),
            "mean": mean, "scores": scores}


def step_times(rounds: int = 7) -> dict:
    """Median ms of one training step (batch 4 of 2x48³, DiceCE, AdamW) and its FLOPs, per network and precision;
    the networks take turns, so a change in the machine's speed affects each alike."""
    from monai.losses import DiceCELoss
    from torch.utils.flop_counter import FlopCounterMode

    from crossmodalseg.nets.unet import UNet, UNetConfig

    strided = [[2, 2, 2]] * 3
    nets = {"plain MONAI UNet 16-32-64-128": recipe.plain_network(2),
            "project, 2 convs, 16-32-64 (fast before)": UNet(UNetConfig(2, 5, [16, 32, 64], strided,
                                                                        [[3, 3, 3]] * 3, 2)),
            "project, 1 conv, 16-32-64-128 (fast now)": UNet(UNetConfig(2, 5, [16, 32, 64, 128],
                                                                        strided + [[1, 1, 1]], [[3, 3, 3]] * 4, 1))}
    x, y = torch.randn(4, 2, 48, 48, 48), torch.randint(0, 5, (4, 1, 48, 48, 48))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    optimizers = {name: torch.optim.AdamW(net.parameters(), 1e-3) for name, net in nets.items()}
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(rounds):
        for name, net in nets.items():
            for precision, dtype in (("float32", None), ("bfloat16", torch.bfloat16)):
                started = time.perf_counter()
                for _ in range(3):
                    with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                        out = net(x)
                    loss = loss_fn(out.float(), y)
                    optimizers[name].zero_grad()
                    loss.backward()
                    optimizers[name].step()
                times.setdefault((name, precision), []).append((time.perf_counter() - started) / 3 * 1000)
    rows = []
    for name, net in nets.items():
        with FlopCounterMode(display=False) as counter:
            loss_fn(net(x), y).backward()
        for precision in ("float32", "bfloat16"):
            rows.append({"network": name, "precision": precision, "gflop_per_step": round(counter.get_total_flops()
                         / 1e9, 1), "ms_per_step_median": round(float(np.median(times[(name, precision)][1:])), 1)})
    return {"threads": torch.get_num_threads(), "rows": rows}


if __name__ == "__main__":
    main()
