"""Training-time noise processes: how clean latents are noised and what the denoiser must predict.

Two families cover the diffusers checkpoints mmalign trains:

- `VariancePreserving` (DDPM-style; SD1.x/2.x, SDXL, AnimateDiff): integer timesteps
  `t ∈ [0, T)`, `x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε`, target `ε` or `v = √ᾱ_t ε − √(1−ᾱ_t) x0`.
- `FlowMatching` (rectified flow; SD3, FLUX.1, Qwen-Image, Wan): `σ ∈ (0, 1)`, `x_σ = (1−σ) x0 + σ ε`, target the
  velocity `ε − x0`; the denoiser reads `t = 1000 σ`.

Every tensor may carry any number of trailing axes after the batch axis (`(B, C, H, W)` images,
`(B, C, F, H, W)` video); per-sample values broadcast over them.
"""

from __future__ import annotations

from typing import Protocol

import torch
from diffusers import DDPMScheduler


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`(B,)` → `(B, 1, …, 1)` matching `like`'s rank, dtype and device."""
    return values.to(device=like.device, dtype=like.dtype).view(-1, *([1] * (like.ndim - 1)))


class NoiseProcess(Protocol):
    num_train_timesteps: int

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor: ...
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...
    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...
    def predicted_noise(self, x_t: torch.Tensor, prediction: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...
    def predicted_x0(self, x_t: torch.Tensor, prediction: torch.Tensor, t: torch.Tensor) -> torch.Tensor: ...


class VariancePreserving:
    """DDPM forward process from a scheduler config; `prediction_type` is `epsilon` or `v_prediction`."""

    def __init__(self, scheduler_config: dict):
        ddpm = DDPMScheduler.from_config(scheduler_config)
        self.alphas_cumprod = ddpm.alphas_cumprod.to(torch.float64)  # (T,)
        self.num_train_timesteps = int(ddpm.config.num_train_timesteps)
        self.prediction_type = ddpm.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unsupported prediction_type {self.prediction_type!r}; expected epsilon or v_prediction")

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """`(n,)` integer timesteps, uniform on `[0, T)`."""
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator)

    def _coefficients(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        abar = self.alphas_cumprod[t.long().cpu()]
        return _expand(abar.sqrt(), like), _expand((1 - abar).sqrt(), like)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self._coefficients(t, x0)
        return a * x0 + s * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        a, s = self._coefficients(t, x0)
        return a * noise - s * x0

    def predicted_noise(self, x_t: torch.Tensor, prediction: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return prediction
        a, s = self._coefficients(t, x_t)
        return s * x_t + a * prediction

    def predicted_x0(self, x_t: torch.Tensor, prediction: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s = self._coefficients(t, x_t)
        if self.prediction_type == "epsilon":
            return (x_t - s * prediction) / a
        return a * x_t - s * prediction


class FlowMatching:
    """Rectified-flow forward process. Timesteps are `1000 σ` (float), as diffusers' flow models read them.

    `sampling` draws σ as SD3's training script does: `"logit_normal"` (u = sigmoid(N(mean, std)))
    or `"uniform"`, then applies the scheduler's `shift`: σ = shift·u / (1 + (shift − 1)·u). A
    scheduler that shifts by resolution at inference (`use_dynamic_shifting`: FLUX.1, Qwen-Image)
    applies no fixed shift, and neither does training here, as diffusers' FLUX training script.
    """

    def __init__(
        self, scheduler_config: dict, sampling: str = "logit_normal", logit_mean: float = 0.0, logit_std: float = 1.0
    ):
        if sampling not in ("logit_normal", "uniform"):
            raise ValueError(f"unknown timestep sampling {sampling!r}; expected logit_normal or uniform")
        self.num_train_timesteps = int(scheduler_config.get("num_train_timesteps", 1000))
        dynamic = scheduler_config.get("use_dynamic_shifting", False)
        self.shift = 1.0 if dynamic else float(scheduler_config.get("shift", 1.0))
        self.sampling, self.logit_mean, self.logit_std = sampling, logit_mean, logit_std

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(torch.float64) / self.num_train_timesteps

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.sampling == "logit_normal":
            u = torch.sigmoid(
                torch.randn(n, generator=generator, dtype=torch.float64) * self.logit_std + self.logit_mean
            )
        else:
            u = torch.rand(n, generator=generator, dtype=torch.float64)
        u = u.clamp(1e-4, 1 - 1e-4)
        sigma = self.shift * u / (1 + (self.shift - 1) * u)
        return (sigma * self.num_train_timesteps).float()

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = _expand(self.sigma(t), x0)
        return (1 - s) * x0 + s * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return noise - x0

    def predicted_noise(self, x_t: torch.Tensor, prediction: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x_t + (1 - _expand(self.sigma(t), x_t)) * prediction

    def predicted_x0(self, x_t: torch.Tensor, prediction: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return x_t - _expand(self.sigma(t), x_t) * prediction


def noise_process(scheduler, flow_sampling: str = "logit_normal") -> VariancePreserving | FlowMatching:
    """The training noise process that matches a pipeline's inference `scheduler`."""
    config = dict(scheduler.config)
    if "FlowMatch" in type(scheduler).__name__:
        return FlowMatching(config, sampling=flow_sampling)
    if config.get("prediction_type") == "flow_prediction" or config.get("use_flow_sigmas"):
        # multistep solvers run on flow sigmas (Wan ships UniPC this way); their shift is `flow_shift`
        return FlowMatching({**config, "shift": config.get("flow_shift", 1.0)}, sampling=flow_sampling)
    return VariancePreserving(config)
