"""Loss functions of the mutual-learning methods: values against independent (numpy, loop) computations, gradient
routing and sign, and the memory bound of CMC's channel-wise contrastive loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from crossmodalseg.losses.consistency import (
    channel_semantic_consistency,
    cycle_loss,
    lsgan_loss,
    soft_dice_consistency,
)
from crossmodalseg.losses.distillation import kd_loss, sigmoid_rampup


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------- independent reference computations (float64)

def kd_reference(student: np.ndarray, teacher: np.ndarray, temperature: float) -> float:
    """T² · mean over (batch, voxels) of KL(p_t || p_s), one voxel at a time."""
    s = student.reshape(student.shape[0], student.shape[1], -1).astype(np.float64)
    t = teacher.reshape(teacher.shape[0], teacher.shape[1], -1).astype(np.float64)
    terms = []
    for b in range(s.shape[0]):
        for v in range(s.shape[2]):
            ps = np.exp(s[b, :, v] / temperature)
            ps /= ps.sum()
            pt = np.exp(t[b, :, v] / temperature)
            pt /= pt.sum()
            terms.append(sum(pt[k] * math.log(pt[k] / ps[k]) for k in range(len(pt))))
    return temperature ** 2 * float(np.mean(terms))


def nt_xent_reference(a: np.ndarray, b: np.ndarray, temperature: float) -> float:
    """Symmetric NT-Xent over channels, one anchor at a time, cosine similarities from explicit dot products."""
    losses = []
    channels = a.shape[1]
    for n in range(a.shape[0]):
        vectors = [a[n, c].ravel().astype(np.float64) for c in range(channels)]
        vectors += [b[n, c].ravel().astype(np.float64) for c in range(channels)]
        for i in range(2 * channels):
            positive = (i + channels) % (2 * channels)
            numerator, denominator = 0.0, 0.0
            for j in range(2 * channels):
                if j == i:
                    continue
                cosine = vectors[i] @ vectors[j] / (np.linalg.norm(vectors[i]) * np.linalg.norm(vectors[j]))
                term = math.exp(cosine / temperature)
                denominator += term
                if j == positive:
                    numerator = term
            losses.append(-math.log(numerator / denominator))
    return float(np.mean(losses))


def soft_dice_reference(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, eps: float = 1e-5) -> float:
    """1 − mean over foreground classes of (2Σab + eps) / (Σa + Σb + eps), sums over batch and (masked) voxels."""
    classes = range(1, a.shape[1]) if a.shape[1] > 1 else range(1)
    dices = []
    for k in classes:
        ak, bk = a[:, k].astype(np.float64), b[:, k].astype(np.float64)
        if mask is not None:
            keep = mask[:, 0].astype(bool)
            ak, bk = ak[keep], bk[keep]
        dices.append((2 * (ak * bk).sum() + eps) / (ak.sum() + bk.sum() + eps))
    return 1.0 - float(np.mean(dices))


# ---------------------------------------------------------------- KD

@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_kd_matches_voxelwise_kl_reference(temperature: float):
    student = torch.randn(2, 3, 2, 3, 2, generator=generator(1)) * 2
    teacher = torch.randn(2, 3, 2, 3, 2, generator=generator(2)) * 2
    value = kd_loss(student, teacher, temperature)
    assert value.dtype == torch.float32 and value.dim() == 0
    expected = kd_reference(student.numpy(), teacher.numpy(), temperature)
    assert value.item() == pytest.approx(expected, rel=1e-5)
    # The test discriminates: the reverse KL (a common slip) and a missing T² give other values.
    reverse = kd_reference(teacher.numpy(), student.numpy(), temperature)
    assert abs(reverse - expected) > 1e-2 * expected
    if temperature != 1.0:
        assert abs(expected / temperature ** 2 - expected) > 1e-2 * expected


def test_kd_is_zero_for_identical_distributions_and_nonnegative():
    logits = torch.randn(2, 4, 3, 3, 3, generator=generator(3))
    assert kd_loss(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)
    # softmax is shift-invariant per voxel: same distributions, zero loss
    assert kd_loss(logits, logits + 5.0).item() == pytest.approx(0.0, abs=1e-5)
    for seed in range(5):
        s = torch.randn(1, 3, 4, 4, 4, generator=generator(10 + seed)) * 3
        t = torch.randn(1, 3, 4, 4, 4, generator=generator(20 + seed)) * 3
        assert kd_loss(s, t).item() >= 0.0


def test_kd_computes_in_float32_for_half_precision_inputs():
    student = torch.randn(1, 3, 4, 4, 4, generator=generator(4)) * 4
    teacher = torch.randn(1, 3, 4, 4, 4, generator=generator(5)) * 4
    value = kd_loss(student.bfloat16(), teacher.bfloat16())
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(kd_loss(student.bfloat16().float(), teacher.bfloat16().float()).item(),
                                         rel=1e-5)


def test_kd_sends_gradient_to_student_only():
    student = torch.randn(2, 3, 3, 3, 3, generator=generator(6), requires_grad=True)
    teacher = torch.randn(2, 3, 3, 3, 3, generator=generator(7), requires_grad=True)
    value = kd_loss(student, teacher)
    assert value.requires_grad
    value.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None or teacher.grad.abs().sum() == 0


def test_kd_descent_step_brings_student_towards_teacher():
    student = torch.randn(2, 3, 3, 3, 3, generator=generator(8), requires_grad=True)
    teacher = torch.randn(2, 3, 3, 3, 3, generator=generator(9))
    value = kd_loss(student, teacher)
    value.backward()
    stepped = (student - 0.5 * student.grad).detach()
    assert kd_loss(stepped, teacher).item() < value.item()
    # judged by the independent reference too, so a loss with the wrong sign cannot pass
    assert kd_reference(stepped.numpy(), teacher.numpy(), 2.0) < kd_reference(student.detach().numpy(),
                                                                            teacher.numpy(), 2.0)


def test_kd_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        kd_loss(torch.zeros(1, 3, 4, 4, 4), torch.zeros(1, 2, 4, 4, 4))


# ---------------------------------------------------------------- ramp-up

def test_sigmoid_rampup_values():
    assert sigmoid_rampup(0.0, 0.2) == pytest.approx(math.exp(-5.0))
    assert sigmoid_rampup(0.1, 0.2) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(0.2, 0.2) == 1.0
    assert sigmoid_rampup(0.7, 0.2) == 1.0
    assert sigmoid_rampup(50.0, 100.0) == pytest.approx(math.exp(-1.25))  # any unit, as long as both agree
    assert sigmoid_rampup(0.0, 0.0) == 1.0
    values = [sigmoid_rampup(p / 20, 0.2) for p in range(6)]
    assert values == sorted(values)


# ---------------------------------------------------------------- CSC (channel-wise NT-Xent)

def test_csc_hand_built_orthogonal_channels():
    # two one-hot channels per modality: cosine 1 with the own channel of the other modality, 0 with everything
    # else, so every anchor has loss -log(e^2 / (e^2 + e^0 + e^0)) at T = 0.5
    a = torch.zeros(1, 2, 2, 2, 1)
    a[0, 0, 0, 0, 0] = 1.0
    a[0, 1, 1, 0, 0] = 1.0
    expected = math.log(1.0 + 2.0 * math.exp(-2.0))
    assert channel_semantic_consistency(a, a.clone(), 0.5).item() == pytest.approx(expected, rel=1e-6)
    # L2 normalisation: the scale of either modality's features does not matter
    assert channel_semantic_consistency(a, 3.0 * a, 0.5).item() == pytest.approx(expected, rel=1e-6)
    # swapping the channels of b makes every positive pair orthogonal: a larger loss
    swapped = a[:, [1, 0]]
    assert channel_semantic_consistency(a, swapped, 0.5).item() > expected + 0.5


@pytest.mark.parametrize("temperature", [0.5, 0.1])
def test_csc_matches_per_anchor_loop(temperature: float):
    a = torch.randn(2, 4, 3, 2, 3, generator=generator(11))
    b = torch.randn(2, 4, 3, 2, 3, generator=generator(12))
    value = channel_semantic_consistency(a, b, temperature)
    assert value.dim() == 0
    assert value.item() == pytest.approx(nt_xent_reference(a.numpy(), b.numpy(), temperature), rel=1e-5)


def test_csc_gradient_reaches_both_modalities_and_descent_aligns_channels():
    a = torch.randn(2, 4, 4, 4, 4, generator=generator(13), requires_grad=True)
    b = torch.randn(2, 4, 4, 4, 4, generator=generator(14), requires_grad=True)
    value = channel_semantic_consistency(a, b)
    assert value.requires_grad
    value.backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert b.grad is not None and b.grad.abs().sum() > 0
    a2, b2 = (a - 2.0 * a.grad).detach(), (b - 2.0 * b.grad).detach()
    assert channel_semantic_consistency(a2, b2).item() < value.item()
    assert nt_xent_reference(a2.numpy(), b2.numpy(), 0.5) < nt_xent_reference(a.detach().numpy(),
                                                                              b.detach().numpy(), 0.5)


class ElementCounter(TorchDispatchMode):
    """Records the element count of every tensor any aten op returns, forward and backward alike."""

    def __init__(self):
        super().__init__()
        self.sizes: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_flatten(out)[0]:
            if isinstance(leaf, torch.Tensor):
                self.sizes.append((str(func), leaf.numel()))
        return out


def csc_intermediates(batch: int, channels: int, side: int) -> tuple[int, int, int]:
    """(largest tensor in forward, largest tensor in backward, number of ops seen in backward)."""
    a = torch.randn(batch, channels, side, side, side, generator=generator(15), requires_grad=True)
    b = torch.randn(batch, channels, side, side, side, generator=generator(16), requires_grad=True)
    with ElementCounter() as forward:
        value = channel_semantic_consistency(a, b)
    with ElementCounter() as backward:
        value.backward()
    assert a.grad is not None and b.grad is not None
    return (max(n for _, n in forward.sizes), max(n for _, n in backward.sizes), len(backward.sizes))


def test_element_counter_sees_a_voxel_by_voxel_matrix():
    # the instrument itself: a naive (N x N) similarity over voxels must show up as N² elements
    x = torch.randn(1, 8, 512, requires_grad=True)
    with ElementCounter() as counter:
        (x.transpose(1, 2) @ x).sum().backward()
    assert max(n for _, n in counter.sizes) >= 512 * 512


def test_csc_memory_is_linear_in_voxels():
    batch, channels = 2, 8
    small_voxels, large_voxels = 16 ** 3, 32 ** 3
    fwd_small, bwd_small, bwd_ops = csc_intermediates(batch, channels, 16)
    assert bwd_ops > 0, "the backward pass was not observed"
    bound = 2 * max(4 * batch * channels * small_voxels, batch * (2 * channels) ** 2)
    assert fwd_small <= bound and bwd_small <= bound, (fwd_small, bwd_small, bound)
    fwd_large, bwd_large, _ = csc_intermediates(batch, channels, 32)
    growth = max(fwd_large, bwd_large) / max(fwd_small, bwd_small)
    ratio = large_voxels / small_voxels  # 8; quadratic growth would give 64
    assert growth <= 1.25 * ratio, growth


# ---------------------------------------------------------------- CAC (soft Dice consistency)

def test_cac_hand_computed_value():
    fg_a = torch.tensor([1.0, 0.5, 0.0, 0.25])
    fg_b = torch.tensor([1.0, 1.0, 0.0, 0.5])
    pa = torch.stack([1 - fg_a, fg_a]).reshape(1, 2, 2, 2, 1)
    pb = torch.stack([1 - fg_b, fg_b]).reshape(1, 2, 2, 2, 1)
    # background excluded: Σab = 1.625, Σa = 1.75, Σb = 2.5
    expected = 1.0 - (2 * 1.625 + 1e-5) / (1.75 + 2.5 + 1e-5)
    assert soft_dice_consistency(pa, pb).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(1.0 / 4.25, rel=1e-5)


def test_cac_matches_reference_multiclass_single_class_and_mask():
    logits_a = torch.randn(2, 4, 3, 4, 2, generator=generator(17)) * 2
    logits_b = torch.randn(2, 4, 3, 4, 2, generator=generator(18)) * 2
    pa, pb = logits_a.softmax(1), logits_b.softmax(1)
    assert soft_dice_consistency(pa, pb).item() == pytest.approx(soft_dice_reference(pa.numpy(), pb.numpy()),
                                                                 rel=1e-5)
    sa, sb = torch.sigmoid(logits_a[:, :1]), torch.sigmoid(logits_b[:, :1])  # K == 1: that class is used
    assert soft_dice_consistency(sa, sb).item() == pytest.approx(soft_dice_reference(sa.numpy(), sb.numpy()),
                                                                 rel=1e-5)
    mask = (torch.rand(2, 1, 3, 4, 2, generator=generator(19)) > 0.4).float()
    masked = soft_dice_consistency(pa, pb, mask=mask).item()
    assert masked == pytest.approx(soft_dice_reference(pa.numpy(), pb.numpy(), mask.numpy()), rel=1e-5)
    # what lies outside the mask does not count
    scrambled = torch.where(mask.bool(), pb, pb.flip(1))
    assert soft_dice_consistency(pa, scrambled, mask=mask).item() == pytest.approx(masked, rel=1e-6)


def test_cac_is_zero_for_identical_one_hot_and_one_for_disjoint():
    labels = torch.randint(0, 3, (2, 4, 4, 4), generator=generator(20))
    labels[0, 0, 0, :3] = torch.tensor([0, 1, 2])  # every class present
    one_hot = torch.nn.functional.one_hot(labels, 3).permute(0, 4, 1, 2, 3).float()
    assert soft_dice_consistency(one_hot, one_hot.clone()).item() == pytest.approx(0.0, abs=1e-6)
    other = one_hot[:, [0, 2, 1]]  # foreground classes swapped
    disjoint = torch.nn.functional.one_hot(torch.zeros_like(labels), 3).permute(0, 4, 1, 2, 3).float()
    assert soft_dice_consistency(one_hot, other).item() > 0.5
    assert soft_dice_consistency(one_hot, disjoint).item() == pytest.approx(1.0, abs=1e-6)


def test_cac_gradient_reaches_both_predictions_and_descent_makes_them_agree():
    logits_a = (torch.randn(2, 3, 4, 4, 4, generator=generator(21)) * 2).requires_grad_(True)
    logits_b = (torch.randn(2, 3, 4, 4, 4, generator=generator(22)) * 2).requires_grad_(True)
    value = soft_dice_consistency(logits_a.softmax(1), logits_b.softmax(1))
    assert value.requires_grad
    value.backward()
    assert logits_a.grad is not None and logits_a.grad.abs().sum() > 0
    assert logits_b.grad is not None and logits_b.grad.abs().sum() > 0
    a2 = (logits_a - 20.0 * logits_a.grad).detach().softmax(1)
    b2 = (logits_b - 20.0 * logits_b.grad).detach().softmax(1)
    assert soft_dice_consistency(a2, b2).item() < value.item()
    # agreement judged independently: the argmax maps overlap more after the step (a similarity returned as loss
    # would drive them apart)
    before = (logits_a.argmax(1) == logits_b.argmax(1)).float().mean().item()
    after = (a2.argmax(1) == b2.argmax(1)).float().mean().item()
    assert after > before
    assert soft_dice_reference(a2.numpy(), b2.numpy()) < soft_dice_reference(
        logits_a.detach().softmax(1).numpy(), logits_b.detach().softmax(1).numpy())


# ---------------------------------------------------------------- IAM losses

def test_lsgan_loss_values_and_gradient():
    prediction = torch.tensor([[0.5, 1.5], [1.0, 0.0]], requires_grad=True)
    real = lsgan_loss(prediction, True)
    assert real.item() == pytest.approx((0.25 + 0.25 + 0.0 + 1.0) / 4)
    assert lsgan_loss(prediction, False).item() == pytest.approx((0.25 + 2.25 + 1.0 + 0.0) / 4)
    assert real.requires_grad
    real.backward()
    assert torch.allclose(prediction.grad, 2 * (prediction.detach() - 1) / 4)


def test_cycle_loss_is_l1():
    original = torch.tensor([[0.0, 1.0, 2.0, -1.0]])
    reconstruction = torch.tensor([[0.5, 1.0, 1.0, 1.0]], requires_grad=True)
    value = cycle_loss(reconstruction, original)
    assert value.item() == pytest.approx((0.5 + 0.0 + 1.0 + 2.0) / 4)
    assert value.requires_grad
    assert cycle_loss(original, original).item() == 0.0


def test_member_disagreement_is_the_mutual_information_of_the_members():
    """The disagreement map against values computed independently (SciPy's entropy, natural log): H(mean p) minus
    the mean of the members' H(p), per voxel."""
    from scipy.stats import entropy

    from crossmodalseg.engine.inferer import mutual_information

    voxels = [  # members' class probabilities at one voxel
        ([1.0, 0.0], [0.0, 1.0]),  # certain and opposite: ln 2
        ([0.9, 0.1], [0.5, 0.5]),
        ([0.2, 0.3, 0.5], [0.2, 0.3, 0.5]),  # identical: 0 however uncertain
        ([0.7, 0.2, 0.1], [0.1, 0.2, 0.7], [1 / 3, 1 / 3, 1 / 3]),
    ]
    for members in voxels:
        probs = [torch.tensor(p, dtype=torch.float64).reshape(-1, 1, 1, 1) for p in members]
        expected = entropy(np.mean(members, axis=0)) - np.mean([entropy(p) for p in members])
        got = float(mutual_information(probs).squeeze())
        assert got == pytest.approx(expected, abs=1e-6), (members, got, expected)
    assert float(mutual_information([torch.tensor([1.0, 0.0]).reshape(2, 1, 1, 1),
                                     torch.tensor([0.0, 1.0]).reshape(2, 1, 1, 1)]).squeeze()) == pytest.approx(
        np.log(2), abs=1e-6)
    volume = [torch.softmax(torch.randn(3, 4, 5, 6), 0) for _ in range(2)]
    assert mutual_information(volume).shape == (4, 5, 6)
