"""Flow-GRPO (arXiv 2505.05470) and DDPO-style GRPO (`method: flow-grpo`), on image and video models.

Rollouts sample with a stochastic kernel (`mmalign.models.trajectory`: `sde`, `cps` or `dance` for
flow-matching models, `ddim` with η > 0 for ε / v models) on a window of steps, recording each window
step's transition. The loss over those steps (`mmalign.losses.flow_grpo_loss`) is the clipped ratio
`ρ = p_θ(x'|x) / p_old(x'|x)` times the group-normalised advantage, plus `β` times the Gaussian KL of
each step to the reference (the adapters off, or a frozen copy under full fine-tuning).

Windows (`window`): `all` steps (Flow-GRPO), a `random` branch of `window_size` consecutive steps per
rollout (Flow-GRPO-Fast), or a `sliding` window that moves from the first to the last steps with
training progress (MixGRPO). Steps outside the window are deterministic and carry no gradient.

`logp_old` is the log-prob under the weights that sampled the rollout, computed at the rollout's
first update in the training layout: that update's ratio is exactly 1 and its gradient is REINFORCE
with the group baseline; the rollout's later `iterations` reuse it. The window's steps form one
graph: memory grows with `window_size`; on large models use a short window or
`model.gradient_checkpointing`.

Defaults follow flow_grpo's SD3 configs where they fit a small model: noise level 0.7 (`sde`), clip
ε = 1e-4, β = 0.04, 10 sampling steps, no guidance in rollouts (its newer configs train CFG-free).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from mmalign.config import ConfigError, check_choice, check_range, option
from mmalign.losses import flow_grpo_loss, gaussian_mean_kl
from mmalign.models.trajectory import KERNELS, WINDOWS, Trajectory, window_steps
from mmalign.train.diffusion_rl import DiffusionRLConfig, DiffusionRLMethod, RolloutBatch
from mmalign.train.rng import key_seed


@dataclass
class FlowGRPOConfig(DiffusionRLConfig):
    """Options of `flow-grpo` (section `flow_grpo`); `train.batch_size` counts prompts per micro-batch."""

    kernel: str = option(
        f"stochastic sampler: {', '.join(KERNELS)} (sde/cps/dance for flow-matching models, ddim for ε / v models)",
        default="sde",
    )
    noise_level: float = option("the kernel's noise: a for sde, η for cps, dance and ddim", default=0.7)
    window: str = option(f"which steps are stochastic and trained: {', '.join(WINDOWS)}", default="all")
    window_size: int = option("steps in a random or sliding window", default=2)
    clip_range: float = option("ε of the ratio clip", default=1e-4)
    beta: float = option("weight of the per-step KL to the reference (0 = no reference)", default=0.04)
    shared_initial_noise: bool = option(
        "the samples of a group start from the same initial noise (DanceGRPO), so their advantages rank "
        "only the stochastic steps' noise, which the loss's log-probabilities see",
        default=False,
    )

    def check_values(self, prefix: str) -> None:
        super().check_values(prefix)
        check_choice(f"{prefix}kernel", self.kernel, KERNELS)
        check_choice(f"{prefix}window", self.window, WINDOWS)
        check_range(f"{prefix}noise_level", self.noise_level, 0, open_low=True)
        if self.kernel != "sde" and self.noise_level > 1:
            raise ConfigError(
                f"config key '{prefix}noise_level' of the {self.kernel} kernel must be ≤ 1, got {self.noise_level}"
            )
        if self.window != "all" and not 1 <= self.window_size <= self.num_steps - (self.kernel == "cps"):
            raise ConfigError(
                f"config key '{prefix}window_size' must be between 1 and the {self.num_steps} sampling steps "
                f"(CPS's last step is deterministic), got {self.window_size}"
            )
        check_range(f"{prefix}clip_range", self.clip_range, 0, open_low=True)
        check_range(f"{prefix}beta", self.beta, 0)


class FlowGRPO(DiffusionRLMethod):
    config_class = FlowGRPOConfig
    config: FlowGRPOConfig

    def needs_reference(self) -> bool:
        return self.config.beta > 0

    def setup(self, accelerator) -> None:
        super().setup(accelerator)
        c = self.config
        try:
            self.model.sampling_grid(c.kernel, c.noise_level, c.num_steps, self.sample_shape(1))
        except ValueError as exc:
            raise ConfigError(f"{self.run.method_section}.kernel: {exc}") from None

    def window(self) -> tuple[int, ...]:
        """The current rollout's window steps."""
        c = self.config
        last = 1 if c.kernel == "cps" else 0
        rng = random.Random(key_seed(self.run.seed, self._rollout_index, "window"))
        progress = self._rollout_index / max(1, self.run.train.max_steps * self.run.train.gradient_accumulation_steps)
        return window_steps(c.window, c.num_steps, c.window_size, progress, rng, last)

    def initial_noise(self, n: int, generator: torch.Generator) -> torch.Tensor | None:
        """`(n, …)` initial latents with each group's `group_size` rows equal under
        `shared_initial_noise`; None (the sampler draws one per sample) otherwise."""
        c = self.config
        if not c.shared_initial_noise:
            return None
        per_group = torch.randn(self.sample_shape(n // c.group_size), generator=generator, dtype=torch.float32)
        return per_group.repeat_interleave(c.group_size, dim=0)

    def generate(self, prompts: list[str]) -> tuple[torch.Tensor, Trajectory]:
        c = self.config
        generator = self.rollout_generator("rollout")
        trajectory = self.model.sample_trajectory(
            prompts,
            kernel=c.kernel,
            noise_level=c.noise_level,
            num_steps=c.num_steps,
            window=self.window(),
            guidance_scale=c.guidance_scale,
            guidance_scale_2=c.guidance_scale_2,
            noise=self.initial_noise(len(prompts), generator),
            generator=generator,
            resolution=self.resolution,
            num_frames=self.num_frames,
        )
        return trajectory.final, trajectory

    def compute_loss(self, batch: RolloutBatch, step: int, micro: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c, traj = self.config, batch.trajectory
        window = torch.tensor(traj.window)
        n, w = traj.latents.shape[0], len(window)
        # every window step of every sample in one denoiser call: rows sample-major, (n·w, …)
        x = traj.latents[:, window].flatten(0, 1)
        x_next = traj.latents[:, window + 1].flatten(0, 1)
        steps = window.repeat(n)
        negative = traj.negative.repeat(w) if traj.negative is not None else None
        args = (x, x_next, steps, traj.grid, traj.cond.repeat(w), negative, traj.guidance_scale, traj.guidance_scale_2)
        logp, mean, std = self.model.transition(*args)
        logp = logp.view(n, w)
        kl = None
        if c.beta:
            _, mean_ref, _ = self.model.transition(*args, use_reference=True)
            kl = gaussian_mean_kl(mean, mean_ref, std).view(n, w)
        metrics = dict(batch.stats)
        if batch.logp_old is None:  # the rollout's first update: the sampling weights
            batch.logp_old = logp.detach()
            metrics["logp_sampling_gap"] = (logp.detach() - traj.log_probs.to(logp.device)).abs().max()
        loss, loss_metrics = flow_grpo_loss(
            logp, batch.logp_old, batch.advantages, clip_range=c.clip_range, beta=c.beta, kl=kl
        )
        return loss, {**metrics, **loss_metrics}
