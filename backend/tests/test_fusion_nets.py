"""Fusion modules (MAML modality-aware module, CMC channel attention and unified fusion) and the MKD translator:
shapes, the formulas of docs/METHODS.md recomputed by hand, and gradient flow. CPU, small tensors."""

from __future__ import annotations

import json

import pytest
import torch

from crossmodalseg.nets.fusion import (
    ChannelAttention,
    ModalityAwareFusion,
    UnifiedFusion,
)
from crossmodalseg.nets.translator import Discriminator, Generator, TranslatorConfig

B, C, S, CLASSES = 2, 4, (8, 8, 8), 3


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _features(k: int, requires_grad: bool = False) -> list[torch.Tensor]:
    return [torch.randn(B, C, *S, requires_grad=requires_grad) for _ in range(k)]


def _assert_all_params_have_grad(module: torch.nn.Module) -> None:
    for name, p in module.named_parameters():
        assert p.grad is not None, name
        assert p.grad.abs().sum() > 0, name


# --- MAML modality-aware module ---------------------------------------------------------------------------------

@pytest.mark.parametrize("k", [2, 3])
def test_modality_aware_fusion_shapes_and_gates(k):
    fusion = ModalityAwareFusion(k, C, CLASSES)
    feats = _features(k)
    logits, f_att = fusion(feats)
    assert logits.shape == (B, CLASSES, *S)
    assert f_att.shape == (B, C, *S)
    gates = fusion.gates(feats)
    assert len(gates) == k
    for a in gates:
        assert a.shape == (B, C, *S)  # voxel- and channel-wise
        assert (a > 0).all() and (a < 1).all()
        assert a.std(dim=1).mean() > 0 and a.flatten(2).std(dim=2).mean() > 0  # really varies over C and voxels
    # No softmax across modalities: the gates do not sum to 1.
    assert not torch.allclose(sum(gates), torch.ones_like(gates[0]), atol=1e-3)
    expected = sum(a * f for a, f in zip(gates, feats))
    torch.testing.assert_close(f_att, expected)
    torch.testing.assert_close(logits, fusion.head(expected))


def test_modality_aware_fusion_zero_modality_contributes_nothing():
    fusion = ModalityAwareFusion(3, C, CLASSES)
    feats = _features(3)
    feats[1] = torch.zeros_like(feats[1])
    _, f_att = fusion(feats)
    gates = fusion.gates(feats)
    torch.testing.assert_close(f_att, gates[0] * feats[0] + gates[2] * feats[2])


def test_modality_aware_fusion_rejects_wrong_modality_count():
    with pytest.raises(ValueError):
        ModalityAwareFusion(2, C, CLASSES)(_features(3))


@pytest.mark.parametrize("k", [2, 3])
def test_modality_aware_fusion_gradient_reaches_every_branch_and_parameter(k):
    fusion = ModalityAwareFusion(k, C, CLASSES)
    feats = _features(k, requires_grad=True)
    logits, _ = fusion(feats)
    logits.square().mean().backward()
    for f in feats:
        assert f.grad is not None and f.grad.abs().sum() > 0
    _assert_all_params_have_grad(fusion)


# --- CMC channel attention (MIA) --------------------------------------------------------------------------------

def test_channel_attention_is_identity_at_init():
    mia = ChannelAttention(C)
    assert mia.gamma.item() == 0.0
    x = torch.randn(B, C, *S)
    out = mia(x)
    assert out.shape == x.shape
    assert torch.equal(out, x)


def test_channel_attention_matches_formula_and_gamma_learns():
    mia = ChannelAttention(C)
    x = torch.randn(B, C, 4, 6, 5, dtype=torch.float64)
    with torch.no_grad():
        mia.gamma.fill_(1.0)
    out = mia(x)
    # By hand: X as (B, C, N); E = X Xᵀ; A = softmax(rowmax(E) − E); out = A X + X.
    flat = x.reshape(B, C, -1)
    expected = torch.empty_like(flat)
    for b in range(B):
        xb = flat[b]
        energy = xb @ xb.T
        assert energy.shape == (C, C)
        shifted = energy.max(dim=1, keepdim=True).values - energy
        attn = torch.exp(shifted) / torch.exp(shifted).sum(dim=1, keepdim=True)
        expected[b] = attn @ xb + xb
    torch.testing.assert_close(out, expected.reshape(x.shape))

    mia = ChannelAttention(C)  # γ = 0 again: gradient must still reach γ
    mia(torch.randn(B, C, *S)).square().sum().backward()
    assert mia.gamma.grad is not None and mia.gamma.grad.abs().item() > 0


# --- CMC unified fusion layer -----------------------------------------------------------------------------------

def test_unified_fusion_shape_range_and_dependence_on_both_inputs():
    fusion = UnifiedFusion(C)
    f_a, f_b = _features(2)
    u = fusion(f_a, f_b)
    assert u.shape == (B, C, *S)
    assert (u > 0).all() and (u < 1).all()
    assert not torch.allclose(fusion(f_a, torch.randn_like(f_b)), u)
    assert not torch.allclose(fusion(torch.randn_like(f_a), f_b), u)
    f_a.requires_grad_(True)
    f_b.requires_grad_(True)
    fusion(f_a, f_b).square().mean().backward()
    assert f_a.grad.abs().sum() > 0 and f_b.grad.abs().sum() > 0
    _assert_all_params_have_grad(fusion)


# --- MKD image alignment module ---------------------------------------------------------------------------------

SMALL = TranslatorConfig(channels=1, filters=4, residual_blocks=2, discriminator_filters=4, discriminator_layers=3)


def test_translator_config_round_trips_through_json():
    config = TranslatorConfig()
    assert TranslatorConfig(**json.loads(json.dumps(config.to_json()))) == config
    assert Generator(SMALL).config is SMALL and Discriminator(SMALL).config is SMALL


@pytest.mark.parametrize("size", [(32, 32, 24), (16, 16, 16)])
def test_generator_keeps_shape_and_starts_near_identity(size):
    gen = Generator(SMALL)
    x = torch.randn(B, 1, *size)
    y = gen(x)
    assert y.shape == x.shape
    assert (y - x).abs().max() < 0.05


def test_generator_rejects_size_not_divisible_by_4():
    with pytest.raises(ValueError):
        Generator(SMALL)(torch.randn(1, 1, 16, 16, 18))


def test_generator_gradient_reaches_every_parameter():
    gen = Generator(SMALL)
    x = torch.randn(B, 1, 16, 16, 16)
    (gen(x) - torch.randn_like(x)).square().mean().backward()
    _assert_all_params_have_grad(gen)


def test_discriminator_scores_small_patches():
    disc = Discriminator(SMALL)
    scores = disc(torch.randn(B, 1, 32, 32, 24))
    assert scores.ndim == 5 and scores.shape[:2] == (B, 1)
    assert all(s >= 1 for s in scores.shape[2:])
    # Deeper than the patch allows with plain padding: dims still stay >= 1.
    deep = Discriminator(TranslatorConfig(discriminator_filters=2, discriminator_layers=6))
    assert all(s >= 1 for s in deep(torch.randn(1, 1, 32, 32, 24)).shape[2:])
    scores.mean().backward()
    _assert_all_params_have_grad(disc)


def test_default_translator_runs_on_a_cpu_patch():
    config = TranslatorConfig()
    x = torch.randn(1, 1, 32, 32, 24)
    with torch.no_grad():
        y = Generator(config)(x)
        scores = Discriminator(config)(y)
    assert y.shape == x.shape and scores.shape[:2] == (1, 1)
