"""Supervised segmentation loss: Dice + cross-entropy (background excluded from Dice), with deep supervision."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.networks.utils import one_hot
from torch import nn

from ..data.spec import IGNORE_INDEX


class SegLoss(nn.Module):
    """Dice + cross-entropy on logits (B, K, ...) against class indices (B, 1, ...), background left out of Dice,
    batch Dice (MONAI's DiceCE with `batch=True`). Voxels labelled IGNORE_INDEX (an "ignore" structure) give no loss
    and no gradient: cross-entropy skips them and the Dice terms see neither their probabilities nor their (absent)
    class, as nnU-Net v2 does with its ignore label. One formulation with or without ignored voxels (it equals
    DiceCE where there are none), so a step never asks the device whether there are any."""

    def __init__(self):
        super().__init__()
        self.dice = DiceLoss(include_background=False, smooth_nr=1e-5, smooth_dr=1e-5, batch=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        known = target != IGNORE_INDEX
        probabilities = torch.softmax(logits, 1) * known
        dice = self.dice(probabilities, one_hot(torch.where(known, target, 0), logits.shape[1]) * known)
        cross_entropy = F.cross_entropy(logits, target[:, 0].long(), ignore_index=IGNORE_INDEX, reduction="sum")
        return dice + cross_entropy / known.sum().clamp_min(1)


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
