"""Peak memory of this process, for the benchmarks' JSON (one place; bench_vs_nnunet also runs it in nnU-Net's
environment, so it needs nothing but the standard library and torch)."""

from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """Peak resident memory in MiB (Linux reports ru_maxrss in KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def peak_gpu_mb(device=None) -> float | None:
    """Peak CUDA memory allocated by torch in MiB; None where CUDA was not used."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    if device is not None and torch.device(device).type != "cuda":
        return None
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
