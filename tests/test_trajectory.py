"""Trajectory sampling for online RL: kernels, log-probabilities and windows (`mmalign.models.trajectory`)."""

from __future__ import annotations

import math
import random

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from mmalign.models.diffusion import DiffusionModel
from mmalign.models.trajectory import (
    StepGrid,
    ddim_std,
    flow_cps_step,
    flow_dance_step,
    flow_sde_step,
    gaussian_log_prob,
    window_steps,
)

PROMPTS = ["a red circle", "two blue squares"]


@pytest.fixture(scope="module")
def sd3(tiny_pipelines) -> DiffusionModel:
    return DiffusionModel.from_pretrained(tiny_pipelines["sd3"], lora_rank=4)


@pytest.fixture(scope="module")
def sd(tiny_pipelines) -> DiffusionModel:
    return DiffusionModel.from_pretrained(tiny_pipelines["sd"], lora_rank=4)


def _noise(model: DiffusionModel, seed: int = 0) -> torch.Tensor:
    shape = model.latent_shape(len(PROMPTS), model.default_resolution)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_flow_sde_at_noise_zero_is_the_deterministic_sampler_bit_for_bit(sd3, guidance):
    noise = _noise(sd3)
    reference = sd3.sample(PROMPTS, num_steps=6, guidance_scale=guidance, noise=noise)
    trajectory = sd3.sample_trajectory(
        PROMPTS, kernel="sde", noise_level=0.0, num_steps=6, guidance_scale=guidance, noise=noise
    )
    assert torch.equal(trajectory.final, reference)
    assert trajectory.log_probs is None
    assert trajectory.latents.shape == (2, 7, *noise.shape[1:])
    assert torch.equal(trajectory.latents[:, 0], noise)


def test_flow_cps_at_noise_zero_is_the_euler_step_up_to_rounding(sd3):
    # CPS rebuilds x' from x̂₀ and ε̂: the same Euler step algebraically, rounded differently
    noise = _noise(sd3)
    reference = sd3.sample(PROMPTS, num_steps=6, guidance_scale=1.0, noise=noise)
    trajectory = sd3.sample_trajectory(PROMPTS, kernel="cps", noise_level=0.0, num_steps=6, noise=noise)
    torch.testing.assert_close(trajectory.final, reference, atol=1e-5, rtol=1e-5)


def test_ddim_at_eta_zero_is_the_deterministic_sampler_bit_for_bit(sd):
    noise = _noise(sd)
    reference = sd.sample(PROMPTS, num_steps=5, guidance_scale=2.0, noise=noise)
    trajectory = sd.sample_trajectory(
        PROMPTS, kernel="ddim", noise_level=0.0, num_steps=5, guidance_scale=2.0, noise=noise
    )
    assert torch.equal(trajectory.final, reference)


def test_kernel_must_fit_the_model_family(sd, sd3):
    with pytest.raises(ValueError, match="does not fit a flow-matching model"):
        sd3.sample_trajectory(PROMPTS, kernel="ddim", noise_level=1.0, num_steps=3)
    with pytest.raises(ValueError, match="use ddim"):
        sd.sample_trajectory(PROMPTS, kernel="sde", noise_level=0.7, num_steps=3)


@pytest.mark.parametrize(
    ("family", "kernel", "level"),
    [("sd3", "sde", 0.7), ("sd3", "cps", 0.8), ("sd3", "dance", 0.5), ("sd", "ddim", 1.0)],
)
def test_recorded_log_prob_is_the_gaussian_density_and_transition_recomputes_it(request, family, kernel, level):
    model = request.getfixturevalue(family)
    generator = torch.Generator().manual_seed(3)
    trajectory = model.sample_trajectory(
        PROMPTS, kernel=kernel, noise_level=level, num_steps=5, guidance_scale=2.0, generator=generator
    )
    assert trajectory.log_probs.shape == (2, len(trajectory.window))
    for w, i in enumerate(trajectory.window):
        x, x_next = trajectory.step_pair(w)
        logp, mean, std = model.transition(
            x, x_next, i, trajectory.grid, trajectory.cond, trajectory.negative, trajectory.guidance_scale
        )
        independent = torch.distributions.Normal(mean.double(), float(std)).log_prob(x_next.double()).mean((1, 2, 3))
        torch.testing.assert_close(logp.double(), independent, atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(logp.detach(), trajectory.log_probs[:, w], atol=1e-4, rtol=1e-5)


def test_transition_has_a_graph_to_the_adapter_and_the_reference_has_none(sd3):
    trajectory = sd3.sample_trajectory(
        PROMPTS, kernel="sde", noise_level=0.7, num_steps=4, generator=torch.Generator().manual_seed(0)
    )
    x, x_next = trajectory.step_pair(1)
    logp, _, _ = sd3.transition(x, x_next, trajectory.window[1], trajectory.grid, trajectory.cond)
    logp.sum().backward()
    grads = [p.grad for p in sd3.trainable_parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    sd3.base_denoiser.zero_grad(set_to_none=True)
    ref_logp, ref_mean, _ = sd3.transition(
        x, x_next, trajectory.window[1], trajectory.grid, trajectory.cond, use_reference=True
    )
    assert not ref_logp.requires_grad and not ref_mean.requires_grad


def test_window_steps_are_noised_and_the_rest_deterministic(sd3):
    noise = _noise(sd3)
    trajectory = sd3.sample_trajectory(
        PROMPTS, kernel="sde", noise_level=0.7, num_steps=6, window=(2, 3), noise=noise,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    ode = sd3.sample_trajectory(PROMPTS, kernel="sde", noise_level=0.0, num_steps=6, noise=noise)
    assert torch.equal(trajectory.latents[:, :3], ode.latents[:, :3])  # identical up to the window
    assert not torch.equal(trajectory.latents[:, 4], ode.latents[:, 4])
    assert trajectory.log_probs.shape == (2, 2)
    with pytest.raises(ValueError, match="cannot be a stochastic cps step"):
        sd3.sample_trajectory(PROMPTS, kernel="cps", noise_level=0.8, num_steps=6, window=(5,))


def test_ddim_std_is_the_noise_coefficient_of_diffusers_ddim_step():
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    scheduler.set_timesteps(10)
    x, pred = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    for t in scheduler.timesteps.tolist():
        plain = scheduler.step(pred, t, x, eta=0.6, variance_noise=torch.zeros_like(x)).prev_sample
        unit = scheduler.step(pred, t, x, eta=0.6, variance_noise=torch.ones_like(x)).prev_sample
        torch.testing.assert_close(unit - plain, torch.full_like(x, float(ddim_std(scheduler, t, 0.6))))


def test_gaussian_log_prob_against_torch_distributions():
    x, mean = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    std = torch.tensor([0.5, 1.0, 2.0]).view(3, 1, 1)
    expected = torch.distributions.Normal(mean, std).log_prob(x).mean((1, 2))
    torch.testing.assert_close(gaussian_log_prob(x, mean, std), expected)
    torch.testing.assert_close(
        gaussian_log_prob(x, mean, torch.tensor(0.3)), torch.distributions.Normal(mean, 0.3).log_prob(x).mean((1, 2))
    )


def _gaussian_flow_velocity(mu: float, tau: float):
    """The exact velocity field of x_σ = (1 − σ)x₀ + σε with x₀ ~ N(μ, τ²): E[ε − x₀ | x_σ = x]."""

    def velocity(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        var = (1 - sigma) ** 2 * tau**2 + sigma**2
        centred = x - (1 - sigma) * mu
        return sigma / var * centred - (mu + (1 - sigma) * tau**2 / var * centred)

    return velocity


def _sample_1d_flow(kernel: str, level: float, mu: float, tau: float, steps: int = 100, n: int = 100_000):
    """`n` samples of the 1-D flow to x₀ ~ N(μ, τ²) with its exact velocity, and the σ grid's midpoint state."""
    euler = FlowMatchEulerDiscreteScheduler(shift=1.0)
    euler.set_timesteps(steps)
    grid = StepGrid(kernel, level, euler.timesteps, sigmas=euler.sigmas.float())
    velocity = _gaussian_flow_velocity(mu, tau)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, generator=generator, dtype=torch.float64)
    middle = None
    for i in range(grid.num_steps):
        v = velocity(x, grid.sigmas[i].double())
        if level == 0 or not grid.is_stochastic(i):
            x = grid.deterministic_step(x, v, i)
        else:
            mean, std = grid.stochastic_step(x, v, i)
            x = mean + std * torch.randn(x.shape, generator=generator, dtype=torch.float64)
        if i + 1 == steps // 2:
            middle = (x, float(grid.sigmas[i + 1]))
    return x, middle


@pytest.mark.parametrize(("kernel", "level"), [("sde", 0.0), ("sde", 0.7), ("dance", 0.5)])
def test_sdes_keep_the_ode_marginals_of_a_known_1d_flow(kernel, level):
    """x₀ ~ N(μ = 1.5, τ² = 0.25): 10⁵ samples after 100 steps have mean and std within 0.02 of the
    data's, and halfway those of x_σ = (1 − σ)x₀ + σε, for the ODE and the SDE kernels."""
    mu, tau = 1.5, 0.5
    x, (middle, sigma) = _sample_1d_flow(kernel, level, mu, tau)
    assert abs(x.mean().item() - mu) < 0.02 and abs(x.std().item() - tau) < 0.02
    expected_std = math.sqrt((1 - sigma) ** 2 * tau**2 + sigma**2)
    assert abs(middle.mean().item() - (1 - sigma) * mu) < 0.02 and abs(middle.std().item() - expected_std) < 0.02


def test_cps_keeps_the_coefficients_of_every_level():
    """CPS's own invariant: with x̂₀ exact (a point mass at μ) every level σ has mean (1 − σ)μ and std σ.
    With spread data it does not keep the ODE marginal: x̂₀ = E[x₀ | x] drops the posterior variance
    of x₀ at every step, and fresh noise of a fixed share of σ' (not shrinking with the step)
    re-draws most of it; on N(1.5, 0.5²) with 100 steps at η = 0.8 the final std is about 0.40."""
    x, (middle, sigma) = _sample_1d_flow("cps", 0.8, mu=1.5, tau=0.0)
    assert abs(middle.mean().item() - (1 - sigma) * 1.5) < 0.01 and abs(middle.std().item() - sigma) < 0.01
    assert abs(x.mean().item() - 1.5) < 1e-6 and x.std().item() < 1e-6
    spread, _ = _sample_1d_flow("cps", 0.8, mu=1.5, tau=0.5)
    assert abs(spread.mean().item() - 1.5) < 0.02 and 0.3 < spread.std().item() < 0.45


def test_kernel_formulas_against_the_flow_grpo_reference_expressions():
    x, v = torch.randn(2, 3), torch.randn(2, 3)
    sigma, sigma_next = torch.tensor(0.6), torch.tensor(0.45)
    a = 0.7
    mean, std = flow_sde_step(x, v, sigma, sigma_next, 0.95, a)
    s = a * math.sqrt(0.6 / 0.4)
    dt = -0.15
    torch.testing.assert_close(mean, x * (1 + s**2 / 1.2 * dt) + v * (1 + s**2 * 0.4 / 1.2) * dt)
    assert math.isclose(float(std), s * math.sqrt(0.15), rel_tol=1e-6)
    # σ = 1: the denominator uses σ_1
    _, std_start = flow_sde_step(x, v, torch.tensor(1.0), torch.tensor(0.9), 0.9, a)
    assert math.isclose(float(std_start), a * math.sqrt(1 / 0.1) * math.sqrt(0.1), rel_tol=1e-6)
    mean, std = flow_cps_step(x, v, sigma, sigma_next, 0.8)
    x0, eps = x - 0.6 * v, x + 0.4 * v
    c = 0.45 * math.sin(0.4 * math.pi)
    torch.testing.assert_close(mean, 0.55 * x0 + math.sqrt(0.45**2 - c**2) * eps)
    assert math.isclose(float(std), c, rel_tol=1e-6)
    mean, std = flow_dance_step(x, v, sigma, sigma_next, 0.5)
    score = -(x - 0.4 * x0) / 0.6**2
    torch.testing.assert_close(mean, x + v * dt - 0.5 * 0.25 * score * dt)
    assert math.isclose(float(std), 0.5 * math.sqrt(0.15), rel_tol=1e-6)


def test_window_steps():
    assert window_steps("all", 6, 2) == tuple(range(6))
    assert window_steps("all", 6, 2, last=1) == tuple(range(5))
    assert window_steps("sliding", 10, 4, progress=0.0) == (0, 1, 2, 3)
    assert window_steps("sliding", 10, 4, progress=1.0) == (6, 7, 8, 9)
    assert window_steps("sliding", 10, 4, progress=0.5) == (3, 4, 5, 6)
    draws = {window_steps("random", 10, 2, rng=random.Random(s)) for s in range(50)}
    assert all(len(w) == 2 and w[1] == w[0] + 1 and 0 <= w[0] <= 8 for w in draws) and len(draws) > 3
    with pytest.raises(ValueError, match="does not fit"):
        window_steps("random", 4, 5)


@pytest.mark.parametrize(("family", "kernel", "level"), [("sd3", "sde", 0.7), ("sd3", "cps", 0.8), ("sd", "ddim", 1.0)])
def test_batched_transitions_equal_one_step_at_a_time(request, family, kernel, level):
    """Every window step of every sample in one denoiser call (what training does) gives each step's
    own log-probability and mean."""
    model = request.getfixturevalue(family)
    trajectory = model.sample_trajectory(
        PROMPTS, kernel=kernel, noise_level=level, num_steps=4, guidance_scale=2.0,
        generator=torch.Generator().manual_seed(5),
    )  # fmt: skip
    window = torch.tensor(trajectory.window)
    w = len(window)
    x, x_next = trajectory.latents[:, window].flatten(0, 1), trajectory.latents[:, window + 1].flatten(0, 1)
    with torch.no_grad():
        logp, mean, _ = model.transition(
            x, x_next, window.repeat(2), trajectory.grid, trajectory.cond.repeat(w), trajectory.negative.repeat(w), 2.0
        )
        for k, i in enumerate(trajectory.window):
            one_logp, one_mean, _ = model.transition(
                *trajectory.step_pair(k), i, trajectory.grid, trajectory.cond, trajectory.negative, 2.0
            )
            torch.testing.assert_close(logp.view(2, w)[:, k], one_logp, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(mean.view(2, w, *mean.shape[1:])[:, k], one_mean, atol=1e-5, rtol=1e-5)
