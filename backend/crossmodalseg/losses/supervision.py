"""Supervised segmentation loss: Dice + cross-entropy (background excluded from Dice), with deep supervision."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.losses import DiceCELoss
from torch import nn


class SegLoss(nn.Module):
    """DiceCE on logits (B, K, ...) against class indices (B, 1, ...)."""

    def __init__(self):
        super().__init__()
        self.loss = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, smooth_nr=1e-5,
                               smooth_dr=1e-5, batch=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(logits.float(), target)


def deep_supervision_weights(n: int) -> list[float]:
    """Weights 1, 1/2, 1/4 ... normalised to sum to 1 (nnU-Net's scheme without the lowest head)."""
    raw = [0.5 ** i for i in range(n)]
    total = sum(raw)
    return [w / total for w in raw]


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of SegLoss over the heads of a deep-supervised network (all heads at full resolution)."""

    def __init__(self):
        super().__init__()
        self.seg = SegLoss()

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.seg(outputs, target)
        weights = deep_supervision_weights(len(outputs))
        return sum(w * self.seg(o, target) for w, o in zip(weights, outputs))
