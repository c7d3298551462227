"""The channels-last memory layout for float32 training on a CPU.

Where a CPU trains in float32 (one without native bfloat16), a step is mostly the 3D convolutions' backward pass,
and oneDNN computes it about twice as fast on channels-last tensors (`torch.channels_last_3d`) as on PyTorch's
default layout (backend/benchmarks/bench_conv_layout.py). PyTorch's instance norm, though, always returns the
default layout, so in a network that alternates convolutions and instance norms every layer would convert back
and forth and the gain would be lost. `InstanceNorm3dChannelsLast` keeps the layout: the instance norm of one
sample is the training-mode batch norm of a batch of that one sample, which PyTorch computes on channels-last
tensors directly. The same function, the same parameters, the same state dict: a network converted here loads and
saves the checkpoints of an unconverted one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class InstanceNorm3dChannelsLast(nn.InstanceNorm3d):
    """nn.InstanceNorm3d (no running statistics) that returns channels-last output for channels-last input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or x.is_contiguous() or not x.is_contiguous(memory_format=torch.channels_last_3d):
            return super().forward(x)
        # split (not indexing): its backward is one concatenation, where indexing would zero-fill a full-size
        # gradient per sample.
        return torch.cat([F.batch_norm(sample, None, None, self.weight, self.bias, True, 0.0, self.eps)
                          for sample in x.split(1)])


def to_channels_last(module: nn.Module) -> nn.Module:
    """`module` with its 3D convolutions' weights in the channels-last layout and each nn.InstanceNorm3d (without
    running statistics) replaced by InstanceNorm3dChannelsLast, sharing its parameters. 2D layers (MKD's slice-wise
    translator) stay as they are. In place; returns `module`."""
    for name, child in module.named_children():
        if type(child) is nn.InstanceNorm3d and not child.track_running_stats:
            norm = InstanceNorm3dChannelsLast(child.num_features, eps=child.eps, affine=child.affine)
            norm.weight, norm.bias = child.weight, child.bias
            setattr(module, name, norm)
        elif isinstance(child, (nn.Conv3d, nn.ConvTranspose3d)):
            child.to(memory_format=torch.channels_last_3d)
        else:
            to_channels_last(child)
    return module


def trains_channels_last(device: torch.device, amp_dtype: torch.dtype | None) -> bool:
    """Whether training on `device` at this precision uses the channels-last layout: float32 on a CPU, where it
    was measured to pay (bench_conv_layout.py). GPUs and bfloat16 CPUs keep the default layout, which is what their
    figures in RESULTS.md were measured with."""
    return device.type == "cpu" and amp_dtype is None
