"""torchrun support: the trainer runs unchanged under `torchrun --nproc_per_node=N` (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import UserError


@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's decision (e.g. 'the time budget is spent') for every rank."""
        if not self.enabled:
            return flag
        return self.broadcast_value(1.0 if flag else 0.0) != 0.0

    def broadcast_value(self, value: float) -> float:
        """Rank 0's value (e.g. the training progress that sets the learning rate) for every rank."""
        if not self.enabled:
            return value
        t = self._tensor(value)
        dist.broadcast(t, src=0)
        return float(t.item())

    def mean(self, value: float) -> float:
        if not self.enabled:
            return value
        t = self._tensor(value)
        dist.all_reduce(t)
        return float(t.item()) / self.world_size

    @staticmethod
    def _tensor(value: float) -> torch.Tensor:
        """A one-element float64 tensor where the process group's backend wants it (NCCL: on the GPU)."""
        t = torch.tensor([value], dtype=torch.float64)
        return t.cuda() if dist.get_backend() == "nccl" else t


def init_distributed(device: torch.device) -> DistContext:
    """Joins the process group when launched by torchrun (WORLD_SIZE > 1); a no-op otherwise."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        torch.cuda.set_device(local)
    return DistContext(dist.get_rank(), dist.get_world_size(), local)


def shutdown_distributed(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def end_torchrun_process(exit_code: int) -> None:
    """Under torchrun (WORLD_SIZE > 1), ends this rank's process at once, skipping the interpreter's teardown; a
    no-op otherwise.

    DDP keeps the gloo process group alive past destroy_process_group (its worker threads go on running; seen with
    torch 2.13), and tearing the interpreter down around them now and then aborts the process with SIGABRT
    ('terminate called without an active exception') after a finished run: 5 of 12 runs of a minimal DDP script,
    0 of 12 with this exit. Nothing is lost: every file the run writes is complete (atomic writes, closed logs)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX-512 BF16 or AMX): there, bf16 autocast roughly halves a
    3D U-Net's time (backend/benchmarks/RESULTS.md); elsewhere it would be emulated, and slower than float32."""
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # another PyTorch build: do not guess
        return False


def autocast_dtype(device: torch.device, enabled: bool = True) -> torch.dtype | None:
    """The mixed-precision type for training and prediction on `device`, None for float32.

    CUDA: bfloat16 where the GPU has it, else float16 (with a gradient scaler); CPU: bfloat16 where native."""
    if not enabled:
        return None
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for, but PyTorch sees no CUDA GPU; use --device cpu")
        local = int(os.environ.get("LOCAL_RANK", "0"))
        # Patches and sliding windows have one fixed shape: cuDNN may time its 3D convolution algorithms once and
        # keep the fastest (nnU-Net does the same). Not yet measured here: the H200 run of 2026-12-04 ran without it.
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda", local)
    if name != "cpu":
        raise UserError(f"unknown device {name!r}; use auto, cpu or cuda")
    return torch.device("cpu")
