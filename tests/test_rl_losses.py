"""Policy-RL losses (GRPO, PAPO's perception KL): invariants and independent loop references."""

from __future__ import annotations

import math
import statistics

import pytest
import torch

from mmalign.losses import aggregate_tokens, group_advantages, grpo_loss, k3_divergence, perception_kl


def test_group_advantages_match_a_loop_reference_and_are_zero_for_constant_groups():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 2.0, -1.0, 0.0, 3.0], dtype=torch.float64)
    adv = group_advantages(rewards, 4)
    expected = []
    for g in range(3):
        group = rewards[4 * g : 4 * g + 4].tolist()
        mean, std = statistics.fmean(group), statistics.stdev(group)  # Bessel, as torch.std
        expected += [0.0 if std == 0 else (r - mean) / (std + 1e-4) for r in group]
    torch.testing.assert_close(adv, torch.tensor(expected, dtype=torch.float64))
    assert torch.equal(adv[4:8], torch.zeros(4, dtype=torch.float64))  # exactly zero, not 1e-12
    unscaled = group_advantages(rewards, 4, scale=False)
    torch.testing.assert_close(unscaled[:4], torch.tensor([0.5, -0.5, -0.5, 0.5], dtype=torch.float64))


def test_group_advantages_invariances():
    r = torch.randn(24, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    adv = group_advantages(r, 6)
    torch.testing.assert_close(adv.reshape(4, 6).mean(1), torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(group_advantages(r + 3.0, 6), adv)  # a shift per group changes nothing
    torch.testing.assert_close(group_advantages(r * 5.0, 6), adv, rtol=1e-3, atol=1e-4)  # scale-free up to ε
    torch.testing.assert_close(group_advantages(r * 5.0, 6, scale=False), 5.0 * group_advantages(r, 6, scale=False))
    assert torch.equal(group_advantages(torch.tensor([3.0]), 1), torch.zeros(1))
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.zeros(5), 2)


def test_k3_is_nonnegative_zero_at_equality_clamped_and_its_expectation_is_the_kl():
    a = torch.randn(1000, generator=torch.Generator().manual_seed(1))
    b = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    assert (k3_divergence(a, b) >= 0).all() and torch.equal(k3_divergence(a, a), torch.zeros(1000))
    assert k3_divergence(torch.tensor([0.0]), torch.tensor([100.0])).item() == 10.0  # clamp at 10
    assert math.isfinite(k3_divergence(torch.tensor([-1e4]), torch.tensor([0.0])).item())
    # E_{y~p}[k3(log p(y), log q(y))] = KL(p || q) exactly for a categorical
    g = torch.Generator().manual_seed(3)  # moderate logits: no token reaches the clamps
    logp = torch.log_softmax(torch.randn(7, dtype=torch.float64, generator=g), 0)
    logq = torch.log_softmax(torch.randn(7, dtype=torch.float64, generator=g), 0)
    expectation = (logp.exp() * k3_divergence(logp, logq)).sum()
    kl = (logp.exp() * (logp - logq)).sum()
    assert expectation.item() == pytest.approx(kl.item(), abs=1e-12)


def test_aggregation_modes_against_hand_computed_values_and_padding():
    values = torch.tensor([[1.0, 3.0, 99.0], [2.0, 2.0, 2.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert aggregate_tokens(values, mask, "token").item() == pytest.approx(10 / 5)
    assert aggregate_tokens(values, mask, "sequence").item() == pytest.approx((2 + 2) / 2)
    assert aggregate_tokens(values, mask, "constant").item() == pytest.approx(10 / 6)
    # equal lengths: token = sequence; appended masked padding never changes a value
    full = torch.ones(2, 3, dtype=torch.long)
    token_mean = aggregate_tokens(values, full, "token").item()
    assert token_mean == pytest.approx(aggregate_tokens(values, full, "sequence").item())
    padded = torch.cat([values, torch.full((2, 2), float("nan"))], 1)
    padded_mask = torch.cat([mask, torch.zeros(2, 2, dtype=torch.long)], 1)
    for mode in ("token", "sequence"):
        expected = aggregate_tokens(values, mask, mode).item()
        assert aggregate_tokens(padded, padded_mask, mode).item() == pytest.approx(expected)
    with pytest.raises(ValueError, match="unknown aggregation"):
        aggregate_tokens(values, mask, "dapo-ish")


def test_on_policy_grpo_is_reinforce_with_the_group_baseline():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 5, 11, generator=g, requires_grad=True)
    tokens = torch.randint(0, 11, (4, 5), generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4)
    logp = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    loss, metrics = grpo_loss(logp, logp.detach(), adv, mask)
    assert metrics["ratio_mean"].item() == 1.0 and metrics["clip_high_frac"].item() == 0.0
    (grad,) = torch.autograd.grad(loss, logits, retain_graph=True)
    # reference: −Σ m A ∇ℓ / Σ m, written out independently
    reference_loss = -(mask * adv[:, None] * logp).sum() / mask.sum()
    (expected,) = torch.autograd.grad(reference_loss, logits)
    torch.testing.assert_close(grad, expected)
    assert loss.item() == pytest.approx(-(mask * adv[:, None]).sum().item() / mask.sum().item(), abs=1e-6)


def test_clipped_tokens_carry_no_gradient():
    logp_old = torch.zeros(2, 2)
    logp = torch.tensor([[0.5, 0.0], [-0.5, 0.0]], requires_grad=True)  # ρ = e^0.5 > 1.28 and e^−0.5 < 0.8
    adv = torch.tensor([1.0, -1.0])
    loss, metrics = grpo_loss(logp, logp_old, adv, torch.ones(2, 2), clip_low=0.2, clip_high=0.28)
    loss.backward()
    assert logp.grad[0, 0] == 0 and logp.grad[1, 0] == 0  # clipped: A>0 with ρ high, A<0 with ρ low
    assert logp.grad[0, 1] != 0 and logp.grad[1, 1] != 0
    assert metrics["clip_high_frac"].item() == 0.25 and metrics["clip_low_frac"].item() == 0.25


def test_kl_penalty_adds_beta_times_k3():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    adv, mask = torch.zeros(1), torch.ones(1, 2)
    loss, metrics = grpo_loss(logp, logp, adv, mask, beta=0.1, logp_ref=ref)
    assert loss.item() == pytest.approx(0.1 * k3_divergence(logp, ref).mean().item())
    assert metrics["kl"].item() == pytest.approx(k3_divergence(logp, ref).mean().item())
    with pytest.raises(ValueError, match="logp_ref"):
        grpo_loss(logp, logp, adv, mask, beta=0.1)


def test_perception_kl_zero_when_unmasked_and_gradient_sign():
    logp = torch.tensor([[-0.2, -3.0, -1.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0]])
    assert perception_kl(logp, logp.detach(), mask).item() == 0.0
    masked = torch.tensor([[-1.0, -1.0, -5.0]])  # token 0: real image makes it likelier; token 1: less likely
    kl = perception_kl(logp, masked, mask)
    u = (masked - logp.detach())[0, :2]
    assert kl.item() == pytest.approx(((u.exp() - u - 1).sum() / 2).item())
    (-kl).backward()  # PAPO subtracts γ·KL: descent raises π(real) where π > π_masked, lowers it elsewhere
    assert logp.grad[0, 0] < 0 and logp.grad[0, 1] > 0 and logp.grad[0, 2] == 0
    # direction matters (KL is asymmetric)
    assert perception_kl(masked, logp.detach(), mask).item() != pytest.approx(kl.item())


def test_constant_aggregation_divides_by_the_generation_limit_as_dr_grpo_does():
    """TRL's dr_grpo: Σ m·λ / (B · max_completion_length), whatever the batch's longest completion."""
    torch.manual_seed(0)
    values, mask = torch.randn(4, 5), (torch.rand(4, 5) > 0.3).long()
    reference = (values * mask).sum() / (4 * 16)
    torch.testing.assert_close(aggregate_tokens(values, mask, "constant", max_length=16), reference)
    # the same tokens padded to a longer batch give the same loss: the normaliser does not move
    padded = torch.cat([values, torch.randn(4, 7)], 1)
    padded_mask = torch.cat([mask, torch.zeros(4, 7, dtype=torch.long)], 1)
    torch.testing.assert_close(aggregate_tokens(padded, padded_mask, "constant", max_length=16), reference)
    with pytest.raises(ValueError, match="max_length=3 is shorter"):
        aggregate_tokens(values, mask, "constant", max_length=3)
