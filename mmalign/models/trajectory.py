"""Stochastic sampling steps with log-probabilities: the rollouts of online RL for diffusion models.

A sampling grid takes the start noise `x_0` through steps `i = 0 … T−1` to the clean latents `x_T`.
On the steps of a *window* the transition is Gaussian, `x_{i+1} ~ N(mean_θ(x_i), std_i² I)`, so its
log-probability can be recorded at rollout and recomputed with gradients at training; every other
step is the deterministic step (Euler for flow matching, DDIM η = 0 otherwise).

Flow-matching kernels, in the notation `x_σ = (1 − σ)·x₀ + σ·ε`, velocity `v = ε − x₀`, a step from
σ to σ' < σ, `dt = σ' − σ`, `x̂₀ = x − σ·v`, `ε̂ = x + (1 − σ)·v`:

- `sde` (Flow-GRPO, arXiv 2505.05470, Eq. 9), noise level `a`: `s = a·sqrt(σ / (1 − σ))` (at σ = 1
  the denominator uses σ_1, the grid's second level), `std = s·sqrt(−dt)`,
  `mean = x·(1 + s²/(2σ)·dt) + v·(1 + s²·(1 − σ)/(2σ))·dt`. At `a = 0` this is the Euler step.
- `cps` (coefficients-preserving sampling, arXiv 2509.05952), noise level `η ∈ [0, 1]`:
  `std = σ'·sin(η·π/2)`, `mean = (1 − σ')·x̂₀ + sqrt(σ'² − std²)·ε̂`: `x'` has exactly the
  coefficients of `x_{σ'}` on `x̂₀` and on fresh noise. Deterministic on the last step (σ' = 0).
- `dance` (DanceGRPO), noise level `η`: score `∇log p = −ε̂/σ`,
  `mean = x + v·dt − ½η²·(∇log p)·dt`, `std = η·sqrt(−dt)`.

For ε / v-prediction models the kernel is `ddim` (DDPO, arXiv 2305.13301): the DDIM step with
`η > 0`, `std = η·sqrt((1 − ᾱ_prev)/(1 − ᾱ_t))·sqrt(1 − ᾱ_t/ᾱ_prev)`, its mean computed by diffusers'
`DDIMScheduler.step` (so prediction types, clipping and thresholding follow the scheduler config).

The log-probability of a step is that of `N(mean, std²)` at `x'`, averaged over the latent's
elements (as Flow-GRPO and DDPO do), one value per sample.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from mmalign.models.families import Conditioning

FLOW_KERNELS = ("sde", "cps", "dance")
VP_KERNELS = ("ddim",)
KERNELS = FLOW_KERNELS + VP_KERNELS
#: which steps are stochastic and trained: every step, a random branch of `window_size` steps per
#: rollout (Flow-GRPO-Fast), or a window that slides from the first steps to the last with training
#: progress (MixGRPO)
WINDOWS = ("all", "random", "sliding")


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A scalar or `(B,)` tensor shaped to broadcast over `like (B, …)`."""
    values = torch.as_tensor(values, dtype=like.dtype, device=like.device)
    return values.reshape(-1, *([1] * (like.ndim - 1))) if values.ndim else values


def flow_sde_step(
    x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, sigma_1: float, noise_level: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow-GRPO's SDE step (module doc): `mean` like `x`, `std` a scalar tensor."""
    dt = sigma_next - sigma
    s = noise_level * torch.sqrt(sigma / (1 - torch.where(sigma == 1, torch.as_tensor(sigma_1), sigma)))
    mean = x * (1 + s**2 / (2 * sigma) * dt) + v * (1 + s**2 * (1 - sigma) / (2 * sigma)) * dt
    return mean, s * torch.sqrt(-dt)


def flow_cps_step(
    x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The coefficients-preserving step (module doc): `mean` like `x`, `std` a scalar tensor."""
    x0_hat, eps_hat = x - sigma * v, x + (1 - sigma) * v
    std = sigma_next * math.sin(noise_level * math.pi / 2)
    mean = (1 - sigma_next) * x0_hat + torch.sqrt((sigma_next**2 - std**2).clamp(min=0)) * eps_hat
    return mean, std


def flow_dance_step(
    x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor, noise_level: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DanceGRPO's SDE step (module doc): `mean` like `x`, `std` a scalar tensor."""
    dt = sigma_next - sigma
    score = -(x + (1 - sigma) * v) / sigma
    mean = x + v * dt - 0.5 * noise_level**2 * score * dt
    return mean, noise_level * torch.sqrt(-dt)


def ddim_std(scheduler: DDIMScheduler, t: int, noise_level: float) -> torch.Tensor:
    """`σ_t(η)` of the DDIM step from timestep `t` on `scheduler`'s current grid (module doc)."""
    prev = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    abar = scheduler.alphas_cumprod[t]
    abar_prev = scheduler.alphas_cumprod[prev] if prev >= 0 else scheduler.final_alpha_cumprod
    return noise_level * torch.sqrt((1 - abar_prev) / (1 - abar) * (1 - abar / abar_prev))


def gaussian_log_prob(x_next: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """`log N(x_next; mean, std²)` averaged over every axis but the batch: `(B, …) → (B,)`.

    `std` broadcasts against `mean` (a scalar, or `(B, 1, …)`). `x_next` is treated as data (no gradient).
    """
    std = _per_sample(std, mean) if torch.is_tensor(std) else torch.as_tensor(std, dtype=mean.dtype)
    log_prob = -((x_next.detach() - mean) ** 2) / (2 * std**2) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


@dataclass
class StepGrid:
    """The discretisation a trajectory follows and its transition kernel.

    `timesteps (T,)`: what the denoiser reads at each step; `sigmas (T+1,)`: the flow levels of
    the grid (flow kernels; ends at 0); `scheduler`: the DDIM scheduler set to the grid (`ddim`).
    """

    kernel: str
    noise_level: float
    timesteps: torch.Tensor
    sigmas: torch.Tensor | None = None
    scheduler: DDIMScheduler | None = None

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)

    def deterministic_step(self, x: torch.Tensor, prediction: torch.Tensor, i: int) -> torch.Tensor:
        """The ODE step `i`: Euler `x + v·dt` (as diffusers' flow-matching Euler scheduler), or DDIM η = 0."""
        if self.scheduler is not None:
            return self.scheduler.step(prediction, self.timesteps[i], x, eta=0.0).prev_sample
        return x + (self.sigmas[i + 1] - self.sigmas[i]) * prediction

    def stochastic_step(
        self, x: torch.Tensor, prediction: torch.Tensor, steps: int | torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean `(N, …)` and std (a scalar, or `(N, 1, …)`) of the Gaussian transition of `x (N, …)` at
        step `steps`: one step index for every row, or one per row `(N,)` (module doc)."""
        if self.kernel == "ddim":
            if isinstance(steps, int):
                t = int(self.timesteps[steps])
                noiseless = torch.zeros_like(x)
                mean = self.scheduler.step(prediction, t, x, eta=self.noise_level, variance_noise=noiseless).prev_sample
                return mean, ddim_std(self.scheduler, t, self.noise_level).to(x.device, x.dtype)
            mean, std = torch.zeros_like(x), torch.zeros(len(steps), *([1] * (x.ndim - 1)), device=x.device)
            for i in steps.unique().tolist():  # DDIM's scheduler steps one timestep at a time
                rows = (steps == i).nonzero().flatten().to(x.device)
                row_mean, row_std = self.stochastic_step(x[rows], prediction[rows], int(i))
                mean, std = (
                    mean.index_put((rows,), row_mean),
                    std.index_put((rows,), row_std.expand(len(rows), 1, *std.shape[2:])),
                )
            return mean, std
        index = torch.as_tensor(steps).cpu()
        sigma, sigma_next = (_per_sample(self.sigmas[j], x) for j in (index, index + 1))
        if self.kernel == "sde":
            return flow_sde_step(x, prediction, sigma, sigma_next, float(self.sigmas[1]), self.noise_level)
        if self.kernel == "cps":
            return flow_cps_step(x, prediction, sigma, sigma_next, self.noise_level)
        return flow_dance_step(x, prediction, sigma, sigma_next, self.noise_level)

    def is_stochastic(self, i: int) -> bool:
        """Whether step `i` can carry noise: every step but CPS's last (σ' = 0 leaves no noise)."""
        return not (self.kernel == "cps" and i == self.num_steps - 1)


def sampling_grid(scheduler, kernel: str, noise_level: float, num_steps: int, set_timesteps) -> StepGrid:
    """The `StepGrid` of `num_steps` steps for a pipeline whose inference scheduler is `scheduler`.

    Flow kernels run on the flow-matching Euler grid of the scheduler's config (its own shift, or
    `flow_shift` for multistep solvers on flow sigmas); `ddim` on a `DDIMScheduler` built from the
    config, as DDPO does. `set_timesteps(scheduler, num_steps)` applies the model's resolution
    shift (`DiffusionModel`).
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown sampler kernel {kernel!r}; expected one of {', '.join(KERNELS)}")
    config = dict(scheduler.config)
    flow = "FlowMatch" in type(scheduler).__name__ or config.get("use_flow_sigmas", False)
    if flow != (kernel in FLOW_KERNELS):
        family = "flow-matching" if flow else "ε / v-prediction"
        choices = FLOW_KERNELS if flow else VP_KERNELS
        raise ValueError(f"sampler kernel {kernel!r} does not fit a {family} model; use {', '.join(choices)}")
    if kernel == "ddim":
        ddim = DDIMScheduler.from_config(config)
        set_timesteps(ddim, num_steps)
        return StepGrid(kernel, noise_level, ddim.timesteps, scheduler=ddim)
    if "FlowMatch" in type(scheduler).__name__:
        euler = FlowMatchEulerDiscreteScheduler.from_config(config)
    else:
        euler = FlowMatchEulerDiscreteScheduler(shift=config.get("flow_shift", 1.0))
    set_timesteps(euler, num_steps)
    return StepGrid(kernel, noise_level, euler.timesteps, sigmas=euler.sigmas.float().cpu())


def window_steps(
    kind: str, num_steps: int, size: int, progress: float = 0.0, rng: random.Random | None = None, last: int = 0
) -> tuple[int, ...]:
    """The steps a rollout trains on (`WINDOWS`).

    `all`: every step; `random`: `size` consecutive steps starting at a uniformly drawn step
    (`rng`); `sliding`: `size` consecutive steps whose start moves linearly from step 0 to the last
    possible start as `progress` goes from 0 to 1. `last` steps at the end are never in the window
    (e.g. CPS's deterministic final step).
    """
    usable = num_steps - last
    if kind == "all":
        return tuple(range(usable))
    if not 1 <= size <= usable:
        raise ValueError(f"a window of {size} steps does not fit {usable} stochastic steps")
    starts = usable - size
    if kind == "random":
        start = (rng or random.Random()).randint(0, starts)
    elif kind == "sliding":
        start = min(starts, int(round(min(max(progress, 0.0), 1.0) * starts)))
    else:
        raise ValueError(f"unknown window {kind!r}; expected one of {', '.join(WINDOWS)}")
    return tuple(range(start, start + size))


@dataclass
class Trajectory:
    """A recorded rollout of B samples.

    `latents (B, T+1, …)`: `x_0` (the start noise) … `x_T` (the clean latents); `window`: the
    stochastic steps, in order; `log_probs (B, W)`: each window step's log-probability under the
    policy that sampled it (None when sampled with noise level 0); `cond`, `negative`: the prompts'
    and the negative prompt's conditioning (B rows each; `negative` is None without guidance);
    `guidance_scale`, `guidance_scale_2`: the guidance it was sampled with (`guidance_scale_2`: the
    low-noise expert's scale on a two-expert pipeline, None = `guidance_scale`); `grid`: the steps it followed.
    """

    latents: torch.Tensor
    window: tuple[int, ...]
    log_probs: torch.Tensor | None
    cond: Conditioning
    negative: Conditioning | None
    guidance_scale: float
    grid: StepGrid
    guidance_scale_2: float | None = None

    @property
    def final(self) -> torch.Tensor:
        """The clean latents `(B, …)`."""
        return self.latents[:, -1]

    def step_pair(self, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(x_i, x_{i+1})` of the `w`-th window step."""
        i = self.window[w]
        return self.latents[:, i], self.latents[:, i + 1]
