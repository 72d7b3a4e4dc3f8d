"""Sampling that records its trajectory, for online RL (Flow-GRPO, DDPO): a mixin of `DiffusionModel`.

`sample_trajectory` samples with a stochastic kernel on a window of steps (`mmalign.models.trajectory`)
and records every step's latents and each window step's log-probability; `transition` recomputes
steps' log-probabilities with gradients from `(x, x_next, step, cond)`.

The class it mixes into provides: `pipe` (its scheduler), `device`, `denoiser` (trainable),
`latent_shape`, `default_resolution`, `guidance_conditioning`, `guided_prediction`, `reference()`,
`_denoiser_for_sampling(use_reference)` and `_set_timesteps(scheduler, num_steps, shape)`.
"""

from __future__ import annotations

import torch

from mmalign.models.families import Conditioning
from mmalign.models.trajectory import StepGrid, Trajectory, gaussian_log_prob, sampling_grid


class TrajectorySampling:
    """`sampling_grid`, `sample_trajectory` and `transition` over the host model's denoiser."""

    def sampling_grid(self, kernel: str, noise_level: float, num_steps: int, shape: tuple[int, ...]) -> StepGrid:
        """The `StepGrid` of `num_steps` steps with `kernel` for latents of `shape` (`mmalign.models.trajectory`)."""
        return sampling_grid(
            self.pipe.scheduler, kernel, noise_level, num_steps, lambda s, n: self._set_timesteps(s, n, shape)
        )

    @torch.no_grad()
    def sample_trajectory(
        self,
        prompts: list[str],
        *,
        kernel: str,
        noise_level: float,
        num_steps: int = 10,
        window: tuple[int, ...] | None = None,
        guidance_scale: float = 1.0,
        guidance_scale_2: float | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        resolution: tuple[int, int] | None = None,
        num_frames: int | None = None,
        negative_prompt: str = "",
    ) -> Trajectory:
        """Sample `prompts` with the trainable denoiser, recording every step's latents and the
        log-probability of each `window` step (default: every stochastic step).

        Window steps draw `x' = mean + std·z` with `z` from `generator` (CPU), in window order;
        all other steps are deterministic. At noise level 0 no log-probability is recorded. Guidance as
        in `sample` (`guidance_scale_2`: the low-noise expert's scale of a two-expert pipeline).
        Returns a `Trajectory` with `latents (B, T+1, …)` and `log_probs (B, W)`.
        """
        resolution = resolution or self.default_resolution
        shape = self.latent_shape(len(prompts), resolution, num_frames)
        grid = self.sampling_grid(kernel, noise_level, num_steps, shape)
        if window is None:
            window = tuple(i for i in range(grid.num_steps) if grid.is_stochastic(i))
        for i in window:
            if not 0 <= i < grid.num_steps or not grid.is_stochastic(i):
                raise ValueError(f"step {i} of {grid.num_steps} cannot be a stochastic {kernel} step")
        if noise is None:
            noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        x = noise.to(self.device, torch.float32)
        cond, negative = self.guidance_conditioning(
            prompts, resolution, guidance_scale, negative_prompt, guidance_scale_2=guidance_scale_2
        )
        latents, log_probs = [x], []
        with self._denoiser_for_sampling(False) as denoiser:
            for i, t in enumerate(grid.timesteps):
                pred = self.guided_prediction(denoiser, x, t, cond, negative, guidance_scale, guidance_scale_2)
                if i in window:
                    mean, std = grid.stochastic_step(x, pred, i)
                    z = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(x.device)
                    x = mean + std * z
                    if noise_level > 0:
                        log_probs.append(gaussian_log_prob(x, mean, std))
                else:
                    x = grid.deterministic_step(x, pred, i)
                latents.append(x)
        return Trajectory(
            latents=torch.stack(latents, dim=1),
            window=tuple(window),
            log_probs=torch.stack(log_probs, dim=1) if log_probs else None,
            cond=cond,
            negative=negative,
            guidance_scale=guidance_scale,
            guidance_scale_2=guidance_scale_2,
            grid=grid,
        )

    def transition(
        self,
        x: torch.Tensor,
        x_next: torch.Tensor,
        steps: int | torch.Tensor,
        grid: StepGrid,
        cond: Conditioning,
        negative: Conditioning | None = None,
        guidance_scale: float = 1.0,
        guidance_scale_2: float | None = None,
        use_reference: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Steps `steps` of `grid` (one index, or one per row `(N,)`) from `x` to `x_next` (both `(N, …)`),
        in one denoiser call: the log-probabilities `(N,)`, the Gaussians' means `(N, …)` and stds. With
        the trainable denoiser (`self.denoiser`, with a graph) or, with `use_reference`, the frozen
        reference (no graph). Each row is guided by the scale of its own step (`guidance_scale_at`)."""
        index = torch.as_tensor(steps)
        t = grid.timesteps[index.to(grid.timesteps.device)]
        if use_reference:
            with torch.no_grad(), self.reference() as denoiser:
                pred = self.guided_prediction(denoiser, x, t, cond, negative, guidance_scale, guidance_scale_2)
        else:
            pred = self.guided_prediction(self.denoiser, x, t, cond, negative, guidance_scale, guidance_scale_2)
        mean, std = grid.stochastic_step(x.to(self.device, torch.float32), pred, steps)
        return gaussian_log_prob(x_next.to(mean.device), mean, std), mean, std
