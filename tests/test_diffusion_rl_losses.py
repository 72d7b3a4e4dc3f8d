"""Losses of online RL for diffusion: Flow-GRPO, DiffusionNFT, multi-reward advantages (`mmalign.losses`)."""

from __future__ import annotations

import torch

from mmalign.losses import (
    diffusion_nft_loss,
    flow_grpo_loss,
    gaussian_mean_kl,
    group_advantages,
    nft_optimality,
    reward_advantages,
)


def test_flow_grpo_first_update_ratio_is_one_and_gradient_is_reinforce():
    torch.manual_seed(0)
    logp = torch.randn(6, 3, requires_grad=True)
    advantages = torch.randn(6)
    loss, metrics = flow_grpo_loss(logp, logp.detach(), advantages, clip_range=1e-4)
    unclipped = -(torch.exp(logp - logp.detach()) * advantages[:, None]).mean()
    assert torch.equal(loss, unclipped)
    assert metrics["ratio_mean"] == 1.0
    loss.backward()
    torch.testing.assert_close(logp.grad, -advantages[:, None].expand(6, 3) / 18)


def test_flow_grpo_clip_against_an_independent_computation():
    torch.manual_seed(1)
    logp, logp_old, advantages = torch.randn(4, 2) * 0.1, torch.randn(4, 2) * 0.1, torch.randn(4)
    eps = 0.05
    loss, _ = flow_grpo_loss(logp, logp_old, advantages, clip_range=eps)
    expected = 0.0
    for b in range(4):
        for i in range(2):
            rho = float(torch.exp(logp[b, i] - logp_old[b, i]))
            a = float(advantages[b])
            expected += -min(rho * a, min(max(rho, 1 - eps), 1 + eps) * a)
    assert abs(float(loss) - expected / 8) < 1e-6


def test_flow_grpo_equal_rewards_give_no_policy_gradient_only_kl():
    logp = torch.randn(4, 2, requires_grad=True)
    advantages = group_advantages(torch.full((4,), 0.7), group_size=4)
    assert torch.equal(advantages, torch.zeros(4))
    kl = torch.rand(4, 2, requires_grad=True)
    loss, metrics = flow_grpo_loss(logp, logp.detach(), advantages, clip_range=0.2, beta=0.5, kl=kl)
    loss.backward()
    assert torch.equal(logp.grad, torch.zeros_like(logp))
    torch.testing.assert_close(loss, 0.5 * kl.mean())
    torch.testing.assert_close(metrics["kl"], kl.detach().mean())


def test_gaussian_mean_kl_against_torch_distributions():
    mean, ref = torch.randn(3, 4, 5), torch.randn(3, 4, 5)
    std = torch.tensor(0.3)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, std), torch.distributions.Normal(ref, std)
    ).mean((1, 2))
    torch.testing.assert_close(gaussian_mean_kl(mean, ref, std), expected)
    assert torch.equal(gaussian_mean_kl(mean, mean, std), torch.zeros(3))


def test_per_reward_normalisation_with_one_reward_is_plain_group_normalisation():
    rewards = torch.randn(12)
    plain = group_advantages(rewards, 4)
    assert torch.equal(reward_advantages({"r": rewards}, {"r": 1.0}, 4, per_reward=True), plain)
    assert torch.equal(reward_advantages({"r": rewards}, {"r": 1.0}, 4, per_reward=False), plain)
    torch.testing.assert_close(reward_advantages({"r": rewards}, {"r": 2.5}, 4, per_reward=True), plain)


def test_per_reward_normalisation_keeps_a_small_scale_reward_from_vanishing():
    torch.manual_seed(2)
    big, small = torch.randn(8) * 100, torch.randn(8) * 0.01
    mixed = reward_advantages({"big": big, "small": small}, {"big": 1.0, "small": 1.0}, 4, per_reward=True)
    expected = 0.5 * group_advantages(big, 4) + 0.5 * group_advantages(small, 4)
    torch.testing.assert_close(mixed, expected)
    summed = reward_advantages({"big": big, "small": small}, {"big": 1.0, "small": 1.0}, 4)
    torch.testing.assert_close(summed, group_advantages(big + small, 4))


def test_nft_optimality():
    a = torch.tensor([-10.0, -5.0, 0.0, 2.5, 5.0, 9.0])
    torch.testing.assert_close(nft_optimality(a, 5.0), torch.tensor([0.0, 0.0, 0.5, 0.75, 1.0, 1.0]))


def test_nft_with_the_old_policy_is_plain_flow_matching_whatever_r():
    torch.manual_seed(3)
    v, target = torch.randn(5, 4, 3, 3), torch.randn(5, 4, 3, 3)
    for r in (torch.zeros(5), torch.ones(5), torch.rand(5)):
        loss, _ = diffusion_nft_loss(v, v.clone(), target, r, beta=1.0)
        torch.testing.assert_close(loss, ((v - target) ** 2).mean())


def test_nft_gradient_moves_towards_good_samples_and_away_from_bad():
    torch.manual_seed(4)
    v_old, target = torch.randn(2, 8), torch.randn(2, 8)
    v = v_old.clone().requires_grad_(True)
    r = torch.tensor([1.0, 0.0])
    loss, _ = diffusion_nft_loss(v, v_old, target, r, beta=0.7)
    loss.backward()
    towards = target - v_old  # the direction that lowers the plain flow-matching error
    assert (-v.grad[0] * towards[0]).sum() > 0  # r = 1: descent moves v towards the sample
    assert (-v.grad[1] * towards[1]).sum() < 0  # r = 0: away from it
