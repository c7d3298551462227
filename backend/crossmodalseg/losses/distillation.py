"""Knowledge distillation between members (MKD, optional in MAML) and the mean-teacher ramp-up of loss weights."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """KD(t -> s; T) = T² · mean over batch and voxels of Σ_k p_t,k (log p_t,k − log p_s,k),

    with p = softmax(z / T) over the class axis 1 of logits (B, K, *spatial). The teacher is detached: the gradient
    reaches the student only.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student and teacher logits differ in shape: {tuple(student_logits.shape)} vs "
                         f"{tuple(teacher_logits.shape)}")
    if student_logits.dim() < 2:
        raise ValueError(f"logits need a class axis (B, K, ...), got shape {tuple(student_logits.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    # float32 even under autocast: the difference of log-probabilities loses everything in half precision.
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1)
    return temperature ** 2 * kl.mean()


def sigmoid_rampup(progress: float, length: float = 0.2) -> float:
    """Mean-teacher ramp: exp(−5 (1 − min(progress / length, 1))²); 1.0 when length == 0.

    `progress` and `length` are in the same unit (fraction of training, epochs or iterations); negative progress
    counts as 0.
    """
    if length < 0:
        raise ValueError(f"ramp-up length must be >= 0, got {length}")
    if length == 0:
        return 1.0
    phase = 1.0 - min(max(progress, 0.0) / length, 1.0)
    return float(math.exp(-5.0 * phase * phase))
