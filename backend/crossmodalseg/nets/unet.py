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


class BranchUNet(nn.Module):
    """A U-Net whose halves are reachable: `encode` returns every level's features (the bottleneck last) and
    `decode` returns the last decoder features with the logits, so methods can fuse features (MAML after the
    decoder, CMC at the bottleneck). Built from MONAI's DynUNet blocks with the same topology as `UNet`."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetOutBlock, UnetUpBlock

        self.config = config
        f, k, s = config.filters, config.kernels, config.strides
        norm, act = ("INSTANCE", {"affine": True}), ("leakyrelu", {"negative_slope": 0.01})
        self.encoder = nn.ModuleList(
            UnetBasicBlock(3, config.in_channels if i == 0 else f[i - 1], f[i], k[i], s[i], norm, act)
            for i in range(len(f)))
        # decoder[j] brings level j+1 up to level j
        self.decoder = nn.ModuleList(
            UnetUpBlock(3, f[j + 1], f[j], k[j], s[j + 1], s[j + 1], norm, act) for j in range(len(f) - 1))
        self.head = UnetOutBlock(3, f[0], config.out_channels)
        heads = config.deep_supr_num if config.deep_supervision else 0
        self.ds_heads = nn.ModuleList(UnetOutBlock(3, f[j], config.out_channels) for j in range(1, 1 + heads))

    @property
    def feature_channels(self) -> int:
        return self.config.filters[0]

    @property
    def bottleneck_channels(self) -> int:
        return self.config.filters[-1]

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for block in self.encoder:
            x = block(x)
            features.append(x)
        return features

    def decode(self, features: list[torch.Tensor], bottleneck: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(last decoder features, [full-resolution logits, deep-supervision logits upsampled to full size...]).
        `bottleneck` replaces the encoder's deepest features (e.g. after fusion)."""
        x = features[-1] if bottleneck is None else bottleneck
        per_level: dict[int, torch.Tensor] = {}
        for j in reversed(range(len(self.decoder))):
            x = self.decoder[j](x, features[j])
            per_level[j] = x
        logits = [self.head(x)]
        for i, head in enumerate(self.ds_heads, start=1):
            low = head(per_level[i])
            logits.append(torch.nn.functional.interpolate(low, size=x.shape[2:], mode="trilinear", align_corners=False))
        return x, logits

    def forward(self, x: torch.Tensor, with_features: bool = False):
        """Logits (a list with deep supervision in training mode); with_features: (last features, logits list).
        Going through forward (not encode/decode) keeps DDP's gradient synchronisation working."""
        features, logits = self.decode(self.encode(x))
        if with_features:
            return features, logits
        return logits if self.training and self.ds_heads else logits[0]
