"""Invariants of the pure losses in mmalign.losses, and a check against an independent formula."""

from __future__ import annotations

import math

import pytest
import torch

from mmalign.losses import diffusion_dpo_loss, per_sample_mse, per_segment_mse


def _errors(b: int = 6, s: int | None = None, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shape = (b,) if s is None else (b, s)
    return [torch.rand(shape, generator=g, dtype=torch.float64) * 0.1 for _ in range(4)]


def test_log2_when_policy_equals_reference():
    _, _, ref_w, ref_l = _errors()
    loss, metrics = diffusion_dpo_loss(ref_w.clone(), ref_l.clone(), ref_w, ref_l, beta=2500)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-12)
    assert metrics["implicit_acc"].item() == 0.0  # z == 0 exactly: not > 0
    assert metrics["z_mean"].item() == 0.0


def test_gradient_lowers_winner_error_and_raises_loser_error():
    pw, pl, rw, rl = _errors()
    pw.requires_grad_(True)
    pl.requires_grad_(True)
    loss, _ = diffusion_dpo_loss(pw, pl, rw, rl, beta=100.0)
    loss.backward()
    assert (pw.grad > 0).all()  # descent decreases the winner's error
    assert (pl.grad < 0).all()  # and increases the loser's


def test_gradient_magnitude_at_init_is_beta_over_two_per_pair():
    b = 4
    pw, pl = torch.zeros(b, requires_grad=True), torch.zeros(b, requires_grad=True)
    loss, _ = diffusion_dpo_loss(pw, pl, torch.zeros(b), torch.zeros(b), beta=10.0)
    loss.backward()
    # dL/de_w = beta * sigma(-z) / B with z = 0
    assert torch.allclose(pw.grad, torch.full((b,), 10.0 * 0.5 / b))
    assert torch.allclose(pl.grad, -pw.grad)


def test_pair_scale_zero_gives_zero_gradient():
    pw, pl, rw, rl = _errors()
    pw.requires_grad_(True)
    pl.requires_grad_(True)
    scale = torch.tensor([0.0, 1.0, 0.0, 2.0, 0.0, 0.5], dtype=torch.float64)
    loss, _ = diffusion_dpo_loss(pw, pl, rw, rl, beta=50.0, pair_scale=scale)
    loss.backward()
    zero = scale == 0
    assert (pw.grad[zero] == 0).all() and (pl.grad[zero] == 0).all()
    assert (pw.grad[~zero] != 0).all()
    full, _ = diffusion_dpo_loss(pw, pl, rw, rl, beta=50.0, pair_scale=torch.zeros(6, dtype=torch.float64))
    assert full.item() == pytest.approx(math.log(2))


def test_swap_antisymmetry():
    pw, pl, rw, rl = _errors()
    _, m1 = diffusion_dpo_loss(pw, pl, rw, rl, beta=7.0)
    _, m2 = diffusion_dpo_loss(pl, pw, rl, rw, beta=7.0)
    assert m1["z_mean"].item() == pytest.approx(-m2["z_mean"].item())


def test_salesforce_convention_equals_plain_with_half_beta():
    from mmalign.image.diffusion_dpo import DiffusionDPOConfig

    pw, pl, rw, rl = _errors()
    half = DiffusionDPOConfig(beta=5000, beta_convention="salesforce_half").effective_beta
    plain = DiffusionDPOConfig(beta=2500, beta_convention="plain").effective_beta
    assert diffusion_dpo_loss(pw, pl, rw, rl, beta=half)[0] == diffusion_dpo_loss(pw, pl, rw, rl, beta=plain)[0]
    with pytest.raises(ValueError, match="beta_convention"):
        _ = DiffusionDPOConfig(beta_convention="half").effective_beta


def test_all_positive_segment_labels_equal_unsegmented_loss():
    g = torch.Generator().manual_seed(3)
    target = torch.randn(3, 4, 6, 2, 2, generator=g, dtype=torch.float64)
    preds = [torch.randn(3, 4, 6, 2, 2, generator=g, dtype=torch.float64) for _ in range(4)]
    frame_segment = torch.tensor([0, 0, 1, 1, 2, 2])
    segmented = [per_segment_mse(p, target, frame_segment, 3) for p in preds]
    whole = [per_sample_mse(p, target) for p in preds]
    for seg, full in zip(segmented, whole):
        assert torch.allclose(seg.sum(1), full, atol=1e-12)
    loss_seg, _ = diffusion_dpo_loss(*segmented, beta=30.0, segment_labels=torch.ones(3, 3))
    loss_full, _ = diffusion_dpo_loss(*whole, beta=30.0)
    assert loss_seg.item() == pytest.approx(loss_full.item(), rel=1e-6)


def test_tie_segments_get_zero_gradient_and_sum_sits_inside_sigmoid():
    pw, pl, rw, rl = _errors(b=2, s=3)
    pw.requires_grad_(True)
    labels = torch.tensor([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    loss, _ = diffusion_dpo_loss(pw, pl, rw, rl, beta=20.0, segment_labels=labels)
    loss.backward()
    assert (pw.grad[labels == 0] == 0).all()
    assert (pw.grad[labels == 1] > 0).all() and (pw.grad[labels == -1] < 0).all()
    # one sigmoid over the labelled sum, not a sum of per-segment sigmoids
    diff = (pw - rw) - (pl - rl)
    z = -20.0 * (labels * diff).sum(1)
    assert loss.item() == pytest.approx(-torch.nn.functional.logsigmoid(z).mean().item())
    per_segment = -torch.nn.functional.logsigmoid(-20.0 * labels * diff).sum(1).mean()
    assert loss.item() != pytest.approx(per_segment.item())


def test_matches_independent_reference_computation():
    pw, pl, rw, rl = _errors(b=16, seed=11)
    scale = torch.rand(16, dtype=torch.float64)
    beta = 1234.5
    loss, metrics = diffusion_dpo_loss(pw, pl, rw, rl, beta=beta, pair_scale=scale)
    expected, correct, zs = 0.0, 0, []
    for i in range(16):
        z = -beta * scale[i].item() * ((pw[i] - rw[i]) - (pl[i] - rl[i])).item()
        expected += math.log1p(math.exp(-z)) if z > -30 else -z
        correct += z > 0
        zs.append(z)
    assert loss.item() == pytest.approx(expected / 16, rel=1e-9)
    assert metrics["implicit_acc"].item() == pytest.approx(correct / 16)
    assert metrics["z_mean"].item() == pytest.approx(sum(zs) / 16)


def test_shape_errors():
    pw, pl, rw, rl = _errors()
    with pytest.raises(ValueError, match="same shape"):
        diffusion_dpo_loss(pw, pl[:3], rw, rl, beta=1.0)
    with pytest.raises(ValueError, match="segment_labels"):
        diffusion_dpo_loss(pw, pl, rw, rl, beta=1.0, segment_labels=torch.ones(6, 2))
    with pytest.raises(ValueError, match="B, C, F, H, W"):
        per_segment_mse(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), torch.zeros(4), 1)
