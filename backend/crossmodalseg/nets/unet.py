"""The segmentation member: a U-Net built from MONAI's DynUNet blocks, configured from the preprocessing plan.

One network class serves every method. Its halves are reachable: `encode` returns every level's features (the
bottleneck last) and `decode` returns the last features at the input's resolution with the logits, so methods can
fuse features (MAML after the decoder, CMC at the bottleneck).

Two shapes, chosen by the plan (not by flags in the methods):
- `strides[0] == 1` (preset `full`, nnU-Net's topology): the first level works at the input's resolution with two
  3x3x3 convolutions per level.
- `strides[0] > 1` (preset `fast`): the first convolution already strides, as MONAI's `UNet` does, and a transposed
  convolution brings the last decoder features back to the input's resolution (`restore`, a few channels). Nothing
  else runs at full resolution, which is where a 3D U-Net spends most of its time on a CPU: measured in
  `backend/benchmarks/RESULTS.md`, this is what makes `fast` train several times more iterations per minute. With
  that stem, `fast` also has one convolution per level and an unstrided last level on the coarsest grid, as MONAI's
  `UNet` (default `num_res_units=0`): at 1500 iterations on BraTS that matched the two-convolution, three-level
  network's Dice or beat it, at about two thirds of its FLOPs (RESULTS.md; the plan decides, see Preset).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from monai.networks.blocks import Convolution
from monai.networks.blocks.dynunet_block import (
    UnetBasicBlock,
    UnetOutBlock,
    get_conv_layer,
)
from torch import nn

from ..data.plan import Plan

NORM = ("INSTANCE", {"affine": True})
ACT = ("leakyrelu", {"negative_slope": 0.01})


@dataclass
class UNetConfig:
    in_channels: int
    out_channels: int
    filters: list[int]
    strides: list[list[int]]  # per level, (z, y, x); strides[0] > 1: the first level is already coarser
    kernels: list[list[int]]
    convs_per_level: int = 2
    deep_supervision_heads: int = 0  # extra heads on decoder levels 1, 2, ... (training only)
    restore_channels: int = 8  # features at the input's resolution when strides[0] > 1

    @classmethod
    def from_plan(cls, plan: Plan, in_channels: int, out_channels: int, width: float = 1.0) -> "UNetConfig":
        filters = [max(4, int(round(f * width))) for f in plan.filters[: len(plan.strides)]]
        heads = max(0, min(plan.deep_supervision_heads, len(plan.strides) - 2))
        return cls(in_channels, out_channels, filters, plan.strides, plan.kernels, plan.convs_per_level, heads,
                   max(4, int(round(plan.restore_channels * width))))

    @classmethod
    def from_json(cls, data: dict) -> "UNetConfig":
        return cls(**data)

    def to_json(self) -> dict:
        return asdict(self)

    @property
    def stem_stride(self) -> list[int]:
        return list(self.strides[0])


def _level(in_channels: int, out_channels: int, kernel, stride, convs: int) -> nn.Module:
    """One encoder or decoder level: conv (strided on the way down) -> IN -> LeakyReLU, once or twice."""
    if convs == 2:
        return UnetBasicBlock(3, in_channels, out_channels, kernel, stride, NORM, ACT)
    return Convolution(3, in_channels, out_channels, strides=stride, kernel_size=kernel, norm=NORM, act=ACT,
                       adn_ordering="NDA", bias=False)


class _Up(nn.Module):
    """Transposed convolution to the finer level, concatenation with its skip features, then that level's convs."""

    def __init__(self, in_channels: int, out_channels: int, kernel, stride, convs: int):
        super().__init__()
        self.up = get_conv_layer(3, in_channels, out_channels, kernel_size=stride, stride=stride, conv_only=True,
                                 is_transposed=True)
        self.conv = _level(2 * out_channels, out_channels, kernel, 1, convs)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class UNet(nn.Module):
    """U-Net member. forward(x) -> full-resolution logits (eval mode), or [full, deep-supervision heads at their own
    (coarser) resolution ...] in training mode when the config has deep-supervision heads."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        f, k, s, convs = config.filters, config.kernels, config.strides, config.convs_per_level
        self.encoder = nn.ModuleList(
            _level(config.in_channels if i == 0 else f[i - 1], f[i], k[i], s[i], convs) for i in range(len(f)))
        self.decoder = nn.ModuleList(_Up(f[j + 1], f[j], k[j], s[j + 1], convs) for j in range(len(f) - 1))
        if any(v != 1 for v in s[0]):
            self.restore = nn.Sequential(
                get_conv_layer(3, f[0], config.restore_channels, kernel_size=s[0], stride=s[0], conv_only=True,
                               is_transposed=True),
                nn.InstanceNorm3d(config.restore_channels, affine=True), nn.LeakyReLU(0.01))
            head_channels = config.restore_channels
        else:
            self.restore = nn.Identity()
            head_channels = f[0]
        self.head = UnetOutBlock(3, head_channels, config.out_channels)
        self.ds_heads = nn.ModuleList(UnetOutBlock(3, f[j], config.out_channels)
                                      for j in range(1, 1 + config.deep_supervision_heads))

    @property
    def feature_channels(self) -> int:
        """Channels of the last features at the input's resolution (what `decode` returns first)."""
        return self.head.conv.conv.in_channels

    @property
    def bottleneck_channels(self) -> int:
        return self.config.filters[-1]

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = []
        for level in self.encoder:
            x = level(x)
            features.append(x)
        return features

    def decode(self, features: list[torch.Tensor], bottleneck: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(last features at the input's resolution, [logits, deep-supervision logits of levels 1, 2, ...]).
        `bottleneck` replaces the encoder's deepest features (e.g. after fusion). Deep-supervision logits keep
        their level's resolution (the loss brings the label down to them)."""
        x = features[-1] if bottleneck is None else bottleneck
        per_level: dict[int, torch.Tensor] = {}
        for j in reversed(range(len(self.decoder))):
            x = self.decoder[j](x, features[j])
            per_level[j] = x
        x = self.restore(x)
        logits = [self.head(x)]
        if self.training:
            logits += [head(per_level[i]) for i, head in enumerate(self.ds_heads, start=1)]
        return x, logits

    def forward(self, x: torch.Tensor, with_features: bool = False
                ) -> torch.Tensor | list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Logits (a list in training mode with deep-supervision heads); with_features: (last features, logits
        list). Going through forward (not encode/decode) keeps DDP's gradient synchronisation working."""
        features, logits = self.decode(self.encode(x))
        if with_features:
            return features, logits
        return logits if self.training and len(logits) > 1 else logits[0]
