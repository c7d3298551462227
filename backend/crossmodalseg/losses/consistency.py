"""Cross-modality consistency losses of CMC (L_CSC, L_CAC) and the image-alignment losses of MKD (LSGAN, cycle).

Unlike CMC's official code, both consistency terms keep their graph (gradient to both modalities' branches) and L_CAC
is a loss (1 − similarity), not a similarity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def channel_semantic_consistency(features_a: torch.Tensor, features_b: torch.Tensor,
                                 temperature: float = 0.5) -> torch.Tensor:
    """CMC's L_CSC: symmetric NT-Xent over channels, each channel of a sample being one "view".

    Per sample, z_i (i < C: channel i of a; i >= C: channel i − C of b) is the L2-normalised channel vector over the
    N voxels, s_ij = z_i·z_j / T, and for every anchor i with positive p(i) = (i + C) mod 2C:
    ℓ_i = −log( exp(s_i,p(i)) / Σ_{j≠i} exp(s_ij) ). The loss is the mean of ℓ_i over the 2C anchors and the batch.
    Memory is O(C² + C·N) per sample: only the (2C × 2C) similarity matrix is formed, never anything voxel × voxel.
    """
    if features_a.shape != features_b.shape:
        raise ValueError(f"features differ in shape: {tuple(features_a.shape)} vs {tuple(features_b.shape)}")
    if features_a.dim() < 3:
        raise ValueError(f"features must be (B, C, *spatial), got shape {tuple(features_a.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    batch, channels = features_a.shape[:2]
    za = F.normalize(features_a.float().reshape(batch, channels, -1), dim=2)
    zb = F.normalize(features_b.float().reshape(batch, channels, -1), dim=2)
    z = torch.cat([za, zb], dim=1)  # (B, 2C, N)
    logits = torch.bmm(z, z.transpose(1, 2)) / temperature  # (B, 2C, 2C)
    self_pair = torch.eye(2 * channels, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_pair, float("-inf"))
    positives = (torch.arange(2 * channels, device=z.device) + channels) % (2 * channels)
    return F.cross_entropy(logits.reshape(batch * 2 * channels, 2 * channels), positives.repeat(batch))


def soft_dice_consistency(prob_a: torch.Tensor, prob_b: torch.Tensor, mask: torch.Tensor | None = None,
                          eps: float = 1e-5) -> torch.Tensor:
    """CMC's L_CAC = 1 − mean_k softDice_k(p_a, p_b) on probabilities (B, K, *spatial) on one grid.

    softDice_k = (2 Σ p_a,k p_b,k + eps) / (Σ p_a,k + Σ p_b,k + eps), the sums running over batch and voxels (as the
    Seg loss's batch Dice) inside the optional mask (B, 1, *spatial). k runs over the foreground classes k >= 1, or
    over the only class when K == 1. The eps in the numerator makes a class that both predictions leave empty count
    as agreement (Dice 1), not as total disagreement. 0 for identical one-hot predictions, 1 for disjoint ones.
    """
    if prob_a.shape != prob_b.shape:
        raise ValueError(f"predictions differ in shape: {tuple(prob_a.shape)} vs {tuple(prob_b.shape)}")
    if prob_a.dim() < 3:
        raise ValueError(f"predictions must be (B, K, *spatial), got shape {tuple(prob_a.shape)}")
    a, b = prob_a.float(), prob_b.float()
    if a.shape[1] > 1:
        a, b = a[:, 1:], b[:, 1:]
    if mask is not None:
        if mask.dim() != a.dim() or mask.shape[1] != 1:
            raise ValueError(f"mask must be (B, 1, *spatial), got shape {tuple(mask.shape)}")
        mask = mask.to(a.dtype)
        a, b = a * mask, b * mask
    reduce = [0] + list(range(2, a.dim()))
    intersection = (a * b).sum(dim=reduce)
    total = a.sum(dim=reduce) + b.sum(dim=reduce)
    dice = (2.0 * intersection + eps) / (total + eps)
    return 1.0 - dice.mean()


def lsgan_loss(prediction: torch.Tensor, target_is_real: bool) -> torch.Tensor:
    """Least-squares GAN loss: mean((D(x) − 1)²) for real targets, mean(D(x)²) for fake ones."""
    target = 1.0 if target_is_real else 0.0
    return ((prediction.float() - target) ** 2).mean()


def cycle_loss(reconstruction: torch.Tensor, original: torch.Tensor) -> torch.Tensor:
    """Cycle-consistency loss: mean |G_b→a(G_a→b(x)) − x| (L1)."""
    if reconstruction.shape != original.shape:
        raise ValueError(f"reconstruction and original differ in shape: {tuple(reconstruction.shape)} vs "
                         f"{tuple(original.shape)}")
    return F.l1_loss(reconstruction.float(), original.float())
