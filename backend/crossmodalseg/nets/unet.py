"""Segmentation members: MONAI's DynUNet configured from the preprocessing plan."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from monai.networks.nets import DynUNet
from torch import nn

from ..data.plan import Plan


@dataclass
class UNetConfig:
    in_channels: int
    out_channels: int
    filters: list[int]
    strides: list[list[int]]
    kernels: list[list[int]]
    deep_supervision: bool = True
    deep_supr_num: int = 2

    @classmethod
    def from_plan(cls, plan: Plan, in_channels: int, out_channels: int, width: float = 1.0,
                  deep_supervision: bool = True) -> "UNetConfig":
        filters = [max(4, int(round(f * width))) for f in plan.filters]
        levels = len(plan.strides)
        heads = max(1, min(plan.deep_supervision_heads, levels - 2))
        return cls(in_channels, out_channels, filters[:levels], plan.strides, plan.kernels,
                   deep_supervision and plan.deep_supervision_heads > 0, deep_supr_num=heads)

    def to_json(self) -> dict:
        return asdict(self)


class UNet(nn.Module):
    """DynUNet that returns full-resolution logits in eval mode and [full, 1/2, 1/4 ...] logits in training mode
    when deep supervision is on (lower-resolution heads upsampled by DynUNet to the full size)."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        self.net = DynUNet(
            spatial_dims=3, in_channels=config.in_channels, out_channels=config.out_channels,
            kernel_size=config.kernels, strides=config.strides, upsample_kernel_size=config.strides[1:],
            filters=config.filters, norm_name=("INSTANCE", {"affine": True}), act_name=("leakyrelu", {"negative_slope": 0.01}),
            deep_supervision=config.deep_supervision, deep_supr_num=config.deep_supr_num, res_block=False,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        out = self.net(x)
        if self.training and self.config.deep_supervision:
            return list(torch.unbind(out, dim=1))  # DynUNet stacks heads on dim 1
        return out
