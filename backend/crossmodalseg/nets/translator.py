"""MKD image alignment module (Li et al. 2020): a CycleGAN-style translator and a PatchGAN discriminator, 3D or 2D
(`spatial_dims`; the paper translates 2D slices).

Inputs are z-scored intensities, so the generator has no output squashing: `G(x) = x + R(x)` with a learned residual
`R` whose last layer starts near zero, so a fresh translator is close to the identity and keeps anatomy. The
discriminator returns raw patch scores for least-squares GAN losses.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from monai.networks.blocks import Convolution
from torch import nn

_NORM = ("INSTANCE", {"affine": True})
_LEAKY = ("LEAKYRELU", {"negative_slope": 0.2})


@dataclass
class TranslatorConfig:
    channels: int = 1
    spatial_dims: int = 3
    filters: int = 16
    residual_blocks: int = 3
    discriminator_filters: int = 16
    discriminator_layers: int = 3

    def to_json(self) -> dict:
        return asdict(self)


def _cbr(dims: int, in_channels: int, out_channels: int, stride: int = 1, act: tuple | str | None = "RELU",
         transposed: bool = False) -> Convolution:
    """Conv3³ or 3² (stride 1 or 2; transposed doubles the size exactly) → InstanceNorm → activation, no conv bias."""
    return Convolution(dims, in_channels, out_channels, strides=stride, kernel_size=3, adn_ordering="NA", norm=_NORM,
                       act=act, bias=False, is_transposed=transposed, padding=1,
                       output_padding=1 if transposed else None)


class _ResidualBlock(nn.Module):
    """`x + IN(Conv3³(ReLU(IN(Conv3³(x)))))`."""

    def __init__(self, dims: int, channels: int):
        super().__init__()
        self.body = nn.Sequential(_cbr(dims, channels, channels), _cbr(dims, channels, channels, act=None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class Generator(nn.Module):
    """Translator `G(x) = x + R(x)`: Conv3³ (c → f) → 2 stride-2 downsamplings (f → 2f → 4f) → residual blocks
    → 2 transposed-conv upsamplings (4f → 2f → f) → Conv3³ (f → c). InstanceNorm + ReLU after every inner conv;
    kernels 3² in 2D. Spatial size of the input must be divisible by 4; output shape = input shape."""

    RESIDUAL_INIT_STD = 1e-3

    def __init__(self, config: TranslatorConfig):
        super().__init__()
        self.config = config
        c, f, d = config.channels, config.filters, config.spatial_dims
        self.residual = nn.Sequential(
            _cbr(d, c, f),
            _cbr(d, f, 2 * f, stride=2),
            _cbr(d, 2 * f, 4 * f, stride=2),
            *[_ResidualBlock(d, 4 * f) for _ in range(config.residual_blocks)],
            _cbr(d, 4 * f, 2 * f, stride=2, transposed=True),
            _cbr(d, 2 * f, f, stride=2, transposed=True),
            Convolution(d, f, c, kernel_size=3, conv_only=True),
        )
        last = self.residual[-1].conv
        nn.init.normal_(last.weight, std=self.RESIDUAL_INIT_STD)  # small, not zero: gradients reach every layer
        nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the translated image, same shape as `x` (B, channels, *spatial)."""
        if any(s % 4 for s in x.shape[2:]):
            raise ValueError(f"spatial size {tuple(x.shape[2:])} must be divisible by 4")
        return x + self.residual(x)


class Discriminator(nn.Module):
    """PatchGAN: Conv4³ s2 + LeakyReLU(0.2), then (layers − 1) × [Conv4³ s2 + InstanceNorm + LeakyReLU(0.2)]
    (filters doubling, capped at 8×), then Conv3³ s1 → 1 channel of raw patch scores (least-squares GAN, no sigmoid);
    kernels 4² and 3² in 2D.
    The stride-2 convs pad by 2, so each maps a size n to ⌊n/2⌋ + 1 ≥ 1: any patch size and depth works."""

    def __init__(self, config: TranslatorConfig):
        super().__init__()
        self.config = config
        f, d = config.discriminator_filters, config.spatial_dims
        layers: list[nn.Module] = [
            Convolution(d, config.channels, f, strides=2, kernel_size=4, padding=2, adn_ordering="A", act=_LEAKY,
                        norm=None)
        ]
        channels = f
        for i in range(1, config.discriminator_layers):
            out = f * min(2 ** i, 8)
            layers.append(Convolution(d, channels, out, strides=2, kernel_size=4, padding=2, adn_ordering="NA",
                                      norm=_NORM, act=_LEAKY, bias=False))
            channels = out
        layers.append(Convolution(d, channels, 1, kernel_size=3, padding=1, conv_only=True))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return patch scores (B, 1, *spatial'), each spatial dim ≥ 1."""
        return self.net(x)
