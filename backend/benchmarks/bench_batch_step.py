"""What a training step of the `fast` U-Net costs by batch size on the test phantoms' patches, at one torch thread
(the learning tests' setting), in the layout and precision the product trains in on this CPU.

The phantoms' patch covers the whole image, so the tests' batches are whole cases (`data/loaders.py`); they train
2 patches a step (`backend/tests/learning.py`). Each step: forward, cross-entropy, backward, SGD. Median and range
of interleaved repeats.

    python backend/benchmarks/bench_batch_step.py --out batch_step_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from phantom_methods import COARSE_SIZE, COARSE_SPACING, SIZE, SPACING

from crossmodalseg.data.phantom import make_phantom_dataset
from crossmodalseg.data.plan import make_plan
from crossmodalseg.nets.layout import to_channels_last
from crossmodalseg.nets.unet import UNet, UNetConfig

# (name, voxels x y z, spacing mm): tests/learning.py's coarse and fine grids and conftest.py's session phantom
GRIDS = (("coarse", COARSE_SIZE, COARSE_SPACING), ("fine", SIZE, SPACING), ("session", (48, 48, 32), (3.0, 3.0, 4.0)))


def step_timer(plan, batch: int):
    net = to_channels_last(UNet(UNetConfig.from_plan(plan, 1, 4)).train())
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    x = torch.randn(batch, 1, *plan.patch_size).to(memory_format=torch.channels_last_3d)
    y = torch.randint(0, 4, (batch, *plan.patch_size))

    def step() -> float:
        started = time.perf_counter()
        out = net(x)
        loss = torch.nn.functional.cross_entropy(out[0] if isinstance(out, list) else out, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return time.perf_counter() - started

    step()  # oneDNN picks its kernels on the first call
    return step


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, size, spacing in GRIDS:
            spec = make_phantom_dataset(Path(tmp) / name, n_cases=2, seed=3, size=size, spacing=spacing)
            plan = make_plan(spec, ["ct"], "fast")
            timers = {b: step_timer(plan, b) for b in args.batches}
            times = {b: [] for b in args.batches}
            for _ in range(args.repeats):
                for b, step in timers.items():
                    times[b].append(step() * 1000)
            for b in args.batches:
                row = {"grid": name, "patch": plan.patch_size, "batch": b,
                       "ms_median": round(statistics.median(times[b])), "ms_min": round(min(times[b])),
                       "ms_max": round(max(times[b]))}
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.out:
        machine = platform.processor() or platform.machine()
        args.out.write_text(json.dumps({"machine": machine, "torch": torch.__version__, "threads": 1, "steps": rows},
                                       indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
