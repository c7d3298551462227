"""Where a CPU training step goes, and whether the channels-last memory layout would speed it up.

On a CPU without native bfloat16 the product trains in float32, and a step's time is mostly the 3D convolutions'
backward pass. This benchmark times, at one torch thread (the learning tests' setting):
- single convolutions of the `fast` U-Net at the learning tests' patch (batch 4 of 24x40x40), forward and forward +
  backward, in PyTorch's default (contiguous) layout and in channels-last (`torch.channels_last_3d`);
- a whole training step (forward, cross-entropy, backward, SGD) of that U-Net in both layouts, once more with
  every InstanceNorm replaced by the equivalent GroupNorm (one group per channel), and once as the product trains
  in float32 on a CPU (`nets/layout.py`: channels-last, with its layout-keeping instance norm). PyTorch's instance
  norm returns a contiguous tensor whatever its input, so in the plain channels-last network every convolution
  after a norm gets the default layout back, and the backward passes convert between the two; its group norm keeps
  the layout but its backward is slow on channels-last tensors.
With `--trainings`, also whole trainings as the learning tests run them (each method, 50 iterations on their
phantom, validation included) with the layout and without it; the product has no switch for the layout, so the
benchmark replaces the trainer's rule (`trains_channels_last`) for the runs without it.
Interleaved repeats, median and range.

    python backend/benchmarks/bench_conv_layout.py --trainings 1 --out conv_layout_cpu.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from crossmodalseg.engine.distributed import cpu_has_native_bf16
from crossmodalseg.nets.layout import to_channels_last
from crossmodalseg.nets.unet import UNet, UNetConfig

BATCH, PATCH = 4, (24, 40, 40)  # the learning tests' phantom: one patch is the whole 24x40x40 volume
LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last_3d}


def seconds(fn: Callable[[], None], repeats: int) -> float:
    fn()  # warm-up: oneDNN builds its kernels for the shape
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def convolution(cin: int, cout: int, shape: tuple[int, int, int], layout: str) -> dict[str, Callable[[], None]]:
    fmt = LAYOUTS[layout]
    conv = nn.Conv3d(cin, cout, 3, padding=1, bias=False).to(memory_format=fmt)
    x = torch.randn(BATCH, cin, *shape).to(memory_format=fmt).requires_grad_()
    grad = torch.randn(BATCH, cout, *shape).to(memory_format=fmt)

    def forward() -> None:
        with torch.no_grad():
            conv(x)

    def forward_backward() -> None:
        conv(x).backward(grad)

    return {"forward": forward, "forward_backward": forward_backward}


def group_norms(net: nn.Module) -> nn.Module:
    """The same network with InstanceNorm3d(C, affine) replaced by GroupNorm(C, C): the same function."""
    for name, child in net.named_children():
        if isinstance(child, nn.InstanceNorm3d):
            setattr(net, name, nn.GroupNorm(child.num_features, child.num_features, eps=child.eps, affine=True))
        else:
            group_norms(child)
    return net


def training_step(layout: str, norm: str) -> Callable[[], None]:
    torch.manual_seed(0)
    config = UNetConfig(1, 4, [16, 32, 64, 128], [[1, 1, 1], [2, 2, 2], [2, 2, 2], [1, 2, 2]], [[3, 3, 3]] * 4, 2)
    net = UNet(config).train()
    if norm == "group":
        net = group_norms(net)
    fmt = LAYOUTS[layout]
    net = to_channels_last(net) if norm == "layout-keeping instance" else net.to(memory_format=fmt)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
    x = torch.randn(BATCH, 1, *PATCH).to(memory_format=fmt)
    y = torch.randint(0, 4, (BATCH, *PATCH))

    def step() -> None:
        out = net(x)
        loss = nn.functional.cross_entropy(out[0] if isinstance(out, list) else out, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


@contextlib.contextmanager
def layout_rule(channels_last: bool) -> Iterator[None]:
    from crossmodalseg.engine import trainer

    product_rule = trainer.trains_channels_last
    trainer.trains_channels_last = product_rule if channels_last else (lambda device, amp_dtype: False)
    try:
        yield
    finally:
        trainer.trains_channels_last = product_rule


def training_seconds(method: str, channels_last: bool, dataset: Path, out: Path) -> float:
    """Wall time of `train` for 2 epochs of 25 iterations (the learning tests' phantom, validation included)."""
    from crossmodalseg.engine.trainer import TrainConfig, train

    config = TrainConfig(method=method, target="ct", assistants=[] if method == "single" else ["mr"], epochs=2,
                         iterations_per_epoch=25, device="cpu", val_every=1, seed=0)
    with layout_rule(channels_last):
        started = time.perf_counter()
        train(dataset, out, config)
        return time.perf_counter() - started


def time_trainings(rounds: int) -> dict[str, dict[str, float]]:
    from crossmodalseg.data.phantom import make_phantom_dataset

    with tempfile.TemporaryDirectory() as tmp:
        dataset = make_phantom_dataset(Path(tmp) / "phantom", n_cases=6, seed=3, size=(40, 40, 24),
                                       spacing=(4.5, 4.5, 6.0)).root
        times: dict[str, list[float]] = {}
        for r in range(rounds):
            for method in ("single", "mkd", "maml", "cmc"):
                for layout in LAYOUTS:
                    seconds_ = training_seconds(method, layout == "channels_last", dataset,
                                                Path(tmp) / f"{method}-{layout}-{r}")
                    times.setdefault(f"{method}, 50 iterations, {layout}", []).append(seconds_)
                    print(f"{method} {layout}: {seconds_:.1f} s", flush=True)
    return {name: {"median": round(statistics.median(v), 1), "min": round(min(v), 1), "max": round(max(v), 1)}
            for name, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--trainings", type=int, default=0, metavar="ROUNDS",
                        help="also time whole trainings of every method, this many interleaved rounds")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    cases: dict[str, Callable[[], None]] = {}
    for cin, cout, shape in [(32, 16, PATCH), (16, 16, PATCH), (64, 32, (12, 20, 20))]:
        for layout in LAYOUTS:
            for kind, fn in convolution(cin, cout, shape, layout).items():
                cases[f"conv {cin}->{cout} at {'x'.join(map(str, shape))}, {kind}, {layout}"] = fn
    for layout in LAYOUTS:
        for norm in ("instance", "group"):
            cases[f"U-Net training step, {norm} norm, {layout}"] = training_step(layout, norm)
    cases["U-Net training step, layout-keeping instance norm, channels_last (the product)"] = training_step(
        "channels_last", "layout-keeping instance")

    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):  # interleaved: a change in the machine's speed hits every case alike
        for name, fn in cases.items():
            times[name].append(seconds(fn, 3) * 1000)
    result = {
        "machine": {"processor": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "threads": args.threads, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "native_bf16": cpu_has_native_bf16()},
        "batch": BATCH, "patch": PATCH, "rounds": args.rounds,
        "ms": {name: {"median": round(statistics.median(v), 1), "min": round(min(v), 1), "max": round(max(v), 1)}
               for name, v in times.items()},
    }
    if args.trainings:
        result["training_s"] = time_trainings(args.trainings)
    for name, v in result["ms"].items():
        print(f"{name:60s} {v['median']:8.1f} ms ({v['min']:.1f}-{v['max']:.1f})")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
