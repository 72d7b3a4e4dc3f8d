"""ReNoise inversion (Garibi et al. 2024): deterministic DDIM inversion refined by fixed-point steps.

`renoise_invert(model, x0, cond, t)` maps clean latents to the noise level `t` of each sample
along the model's own deterministic sampling path (no guidance, no gradient). Each inversion
step from level a to level b (a < b) solves `z_b = Inv(z_a, ε(z_b, b))` approximately:

    z_b⁽⁰⁾ = Inv(z_a, ε(z_a, b)),   z_b⁽ᵏ⁾ = Inv(z_a, ε(z_b⁽ᵏ⁻¹⁾, b))  for k = 1..K,

averaging the noise estimates of the iterations in `average_window` for the final step. `Inv`
is the DDIM update run backwards: predict x̂0 from `(z_a, ε̂)` at level a, then re-noise it
with the same ε̂ to level b. It works for every noise process (`VariancePreserving` with ε or v
prediction, `FlowMatching` with velocity): predictions are first converted to noise estimates.

The grid: `steps` equal sub-steps from 0 to each sample's own `t`, so the inverted latent sits
exactly at the sampled level (mmalign's default). `official_grid=True` reproduces SmPO's code
grid instead: the DDIM "leading" grid {1, 1+T/steps, …} up to the last point below `t`. Both start
from the clean latent at level 0 (ᾱ = 1); SmPO's code starts its first step from ᾱ_0 = 0.99915,
SD's first timestep, a difference of that first step only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mmalign.models.noise import NoiseProcess


def _levels(
    t: torch.Tensor, steps: int, num_train_timesteps: int, official_grid: bool, integer: bool
) -> list[torch.Tensor]:
    """Per-sample levels `[l_0 = 0, l_1, …, l_n]` as a list of `(B,)` tensors (n = `steps`)."""
    t = t.double()
    if not official_grid:
        levels = [t * i / steps for i in range(steps + 1)]
    else:
        stride = num_train_timesteps // steps
        grid = [0.0] + [1.0 + stride * i for i in range(steps)]
        levels = [torch.where(torch.full_like(t, g) < t, torch.full_like(t, g), torch.zeros_like(t)) for g in grid]
        # below-t grid points only; samples whose grid ends early stay at their last point
        for i in range(1, len(levels)):
            levels[i] = torch.maximum(levels[i], levels[i - 1])
    return [lv.round() if integer else lv for lv in levels]


def _grid_steps(noise: NoiseProcess, t: torch.Tensor, steps: int, official_grid: bool, like: torch.Tensor):
    """The grid's moves from level a to level b (a < b), low to high, that move at least one sample:
    `(a, b, moving, a_is_clean)` with `a, b (B,)` levels (integer when `t` is) and the masks shaped
    to broadcast over `like`."""
    integer = not t.is_floating_point()
    levels = _levels(t.cpu(), steps, noise.num_train_timesteps, official_grid, integer)
    shape = (-1, *[1] * (like.ndim - 1))
    for a, b in zip(levels[:-1], levels[1:]):
        moving = (b > a).to(like.device).view(shape)
        if moving.any():
            a_t, b_t = (a.long(), b.long()) if integer else (a.float(), b.float())
            yield a_t, b_t, moving, (a == 0).to(like.device).view(shape)


@torch.no_grad()
def renoise_invert(
    estimate_noise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: NoiseProcess,
    x0: torch.Tensor,
    t: torch.Tensor,
    *,
    steps: int = 5,
    renoise_iterations: int = 1,
    average_window: tuple[int, int] = (0, 2),
    official_grid: bool = False,
) -> torch.Tensor:
    """Invert clean latents `x0 (B, …)` to levels `t (B,)`; returns `x̃_t` with no graph.

    `estimate_noise(z, level)` returns the model's noise estimate ε̂ at `(z, level)` (see
    `DiffusionModel.invert`, which builds it from the denoiser without guidance).
    `renoise_iterations` is K (0 = plain DDIM inversion); `average_window = (k0, k1)` averages
    the estimates of iterations k0 ≤ k < k1, iteration 0 being the DDIM estimate (SmPO's code:
    K = 1, (0, 2)). The start level is the clean latent itself (ᾱ = 1, σ = 0).
    """
    z = x0
    for a_t, b_t, moving, start_clean in _grid_steps(noise, t, steps, official_grid, x0):
        estimates = [estimate_noise(z, b_t)]
        for _ in range(renoise_iterations):
            candidate = _ddim_move(noise, z, estimates[-1], a_t, b_t, start_clean)
            estimates.append(estimate_noise(candidate, b_t))
        k0, k1 = average_window
        chosen = estimates[k0 : min(k1, len(estimates))] or estimates[-1:]
        z = torch.where(moving, _ddim_move(noise, z, torch.stack(chosen).mean(0), a_t, b_t, start_clean), z)
    return z


def _ddim_move(
    noise: NoiseProcess,
    z: torch.Tensor,
    eps: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    start_clean: torch.Tensor,
) -> torch.Tensor:
    """Deterministic DDIM update of `z` from level `start` up to `end` with noise estimate `eps`:
    the clean latent implied at `start` (z itself where `start_clean`), re-noised with `eps`."""
    x0_hat = torch.where(start_clean, z, _x0_from_noise(noise, z, eps, start))
    return noise.add_noise(x0_hat, eps, end)


def _signal_and_spread(noise: NoiseProcess, like: torch.Tensor, level: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Coefficients of `x_t = signal · x0 + spread · ε` at `level` (√ᾱ, √(1−ᾱ) or 1 − σ, σ), shaped like `like`."""
    signal = noise.add_noise(torch.ones_like(like), torch.zeros_like(like), level)
    spread = noise.add_noise(torch.zeros_like(like), torch.ones_like(like), level)
    return signal, spread


def _x0_from_noise(noise: NoiseProcess, z: torch.Tensor, eps: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """Clean latent implied by a noisy latent and a noise estimate at `level`."""
    signal, spread = _signal_and_spread(noise, z, level)
    return (z - spread * eps) / signal


def implied_noise(noise: NoiseProcess, x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The noise τ with `x_t = add_noise(x0, τ, t)`: SmPO's regression target after inversion."""
    signal, spread = _signal_and_spread(noise, x0, t)
    return (x_t - signal * x0) / spread


@torch.no_grad()
def ddim_reconstruct(
    estimate_noise: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    noise: NoiseProcess,
    x_t: torch.Tensor,
    t: torch.Tensor,
    *,
    steps: int = 5,
    official_grid: bool = False,
) -> torch.Tensor:
    """Deterministic DDIM sampling from `x_t` at levels `t (B,)` back to clean latents, along the
    grid `renoise_invert` uses (the inverse of inversion: a good inversion reconstructs `x0`)."""
    z = x_t
    for a_t, b_t, moving, end_clean in reversed(list(_grid_steps(noise, t, steps, official_grid, x_t))):
        eps = estimate_noise(z, b_t)
        x0_hat = _x0_from_noise(noise, z, eps, b_t)
        z = torch.where(moving, torch.where(end_clean, x0_hat, noise.add_noise(x0_hat, eps, a_t)), z)
    return z
