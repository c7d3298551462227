"""Supervised segmentation loss: Dice + cross-entropy (background excluded from Dice), with deep supervision."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
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
    """Weights 1, 1/2, 1/4 ... normalised to sum to 1 (METHODS.md: w ∝ [1, 1/2, 1/4, 1/8], nnU-Net's scheme)."""
    raw = [0.5 ** i for i in range(n)]
    total = sum(raw)
    return [w / total for w in raw]


def label_at(target: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Class indices (B, 1, ...) brought down to a coarser grid by nearest-neighbour sampling."""
    if tuple(target.shape[2:]) == tuple(size):
        return target
    return F.interpolate(target.float(), size=list(size), mode="nearest-exact").to(target.dtype)


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of SegLoss over the heads of a deep-supervised network; a head at a coarser resolution is scored
    against the label brought down to it (cheaper than bringing its logits up)."""

    def __init__(self):
        super().__init__()
        self.seg = SegLoss()

    def forward(self, outputs: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        if isinstance(outputs, torch.Tensor):
            return self.seg(outputs, target)
        weights = deep_supervision_weights(len(outputs))
        return sum(w * self.seg(o, label_at(target, o.shape[2:])) for w, o in zip(weights, outputs))
