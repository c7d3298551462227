"""Fusion modules of the mutual-learning methods (docs/METHODS.md).

- `ModalityAwareFusion`: MAML's modality-aware module (Zhang et al. 2021).
- `ChannelAttention`: CMC's channel attention (MIA) on a bottleneck (Zhou et al. 2024).
- `UnifiedFusion`: CMC's unified fusion layer (Zhou et al. 2024).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.blocks import Convolution
from torch import nn

_NORM = ("INSTANCE", {"affine": True})
_LEAKY = ("LEAKYRELU", {"negative_slope": 0.01})


def _conv(in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True) -> Convolution:
    """Plain 3D convolution ('same' padding), no norm or activation."""
    return Convolution(3, in_channels, out_channels, kernel_size=kernel_size, conv_only=True, bias=bias)


def _conv_norm_act(in_channels: int, out_channels: int, act: tuple | str) -> Convolution:
    """Conv3³ → InstanceNorm → activation. No conv bias: the instance norm removes it anyway."""
    return Convolution(3, in_channels, out_channels, kernel_size=3, adn_ordering="NA", norm=_NORM, act=act,
                       bias=False)


class ModalityAwareFusion(nn.Module):
    """MAML modality-aware module.

    `F_dual = Conv3³(cat[F_1..F_k])` (k·C → C);
    `A_i = sigmoid(Conv3³(LeakyReLU(InstanceNorm(Conv3³(cat[F_i, F_dual])))))` (2C → C → C), one gate per modality;
    `F_att = Σ_i A_i ⊙ F_i`; `P_att = Conv1³(F_att)` (C → num_classes).
    Gates are voxel- and channel-wise (shape (B, C, *spatial)); no softmax across modalities.
    """

    def __init__(self, num_modalities: int, channels: int, num_classes: int):
        super().__init__()
        if num_modalities < 1 or channels < 1 or num_classes < 1:
            raise ValueError("num_modalities, channels and num_classes must be >= 1")
        self.num_modalities = num_modalities
        self.channels = channels
        self.num_classes = num_classes
        self.dual = _conv(num_modalities * channels, channels)
        self.gate_nets = nn.ModuleList(
            nn.Sequential(_conv_norm_act(2 * channels, channels, _LEAKY), _conv(channels, channels), nn.Sigmoid())
            for _ in range(num_modalities)
        )
        self.head = _conv(channels, num_classes, kernel_size=1)

    def _check(self, features: Sequence[torch.Tensor]) -> None:
        if len(features) != self.num_modalities:
            raise ValueError(f"expected {self.num_modalities} modality features, got {len(features)}")
        for f in features:
            if f.shape[1] != self.channels:
                raise ValueError(f"expected {self.channels} channels, got shape {tuple(f.shape)}")

    def gates(self, features: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The gates `A_i` in (0, 1), each of shape (B, C, *spatial)."""
        self._check(features)
        f_dual = self.dual(torch.cat(list(features), dim=1))
        return [net(torch.cat([f, f_dual], dim=1)) for f, net in zip(features, self.gate_nets)]

    def forward(self, features: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Return `(P_att, F_att)`: fused logits (B, num_classes, *spatial) and fused features (B, C, *spatial)."""
        gates = self.gates(features)
        f_att = gates[0] * features[0]
        for a, f in zip(gates[1:], features[1:]):
            f_att = f_att + a * f
        return self.head(f_att), f_att


class ChannelAttention(nn.Module):
    """CMC channel attention (MIA) on a bottleneck X of shape (B, C, *spatial), seen as (B, C, N).

    `E = X Xᵀ` (B, C, C); `A = softmax(rowmax(E) − E, dim=-1)`; `MIA(X) = γ · (A X) + X`,
    γ a learnable scalar initialised to 0 (identity at init). Memory O(C² + C·N).
    The attention is computed in float32 with autocast off: `X Xᵀ` sums over N voxels and overflows float16.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.gamma = nn.Parameter(torch.zeros(1))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, C, C) channel attention matrix `A` (float32 or float64)."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            flat = x.reshape(x.shape[0], x.shape[1], -1).to(torch.promote_types(x.dtype, torch.float32))
            energy = torch.bmm(flat, flat.transpose(1, 2))
            energy = energy.amax(dim=-1, keepdim=True) - energy
            return torch.softmax(energy, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return `γ · (A X) + X`, same shape and dtype as `x`."""
        if x.shape[1] != self.channels:
            raise ValueError(f"expected {self.channels} channels, got shape {tuple(x.shape)}")
        attn = self.attention(x)
        with torch.autocast(device_type=x.device.type, enabled=False):
            flat = x.reshape(x.shape[0], x.shape[1], -1).to(attn.dtype)
            out = torch.bmm(attn, flat).reshape(x.shape)
            return (self.gamma.to(attn.dtype) * out + x.to(attn.dtype)).to(x.dtype)


class UnifiedFusion(nn.Module):
    """CMC unified fusion layer: `U = sigmoid(CBR(CBR(cat[F_a, F_b])))`, CBR = Conv3³ → InstanceNorm → ReLU,
    2C → C then C → C. Each decoder then gets `Z_m = F_m + U`."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.net = nn.Sequential(
            _conv_norm_act(2 * channels, channels, "RELU"),
            _conv_norm_act(channels, channels, "RELU"),
            nn.Sigmoid(),
        )

    def forward(self, f_a: torch.Tensor, f_b: torch.Tensor) -> torch.Tensor:
        """Return `U` in (0, 1), shape (B, C, *spatial)."""
        if f_a.shape != f_b.shape:
            raise ValueError(f"feature shapes differ: {tuple(f_a.shape)} vs {tuple(f_b.shape)}")
        return self.net(torch.cat([f_a, f_b], dim=1))
