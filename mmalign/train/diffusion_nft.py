"""DiffusionNFT (arXiv 2509.16117; `method: diffusion-nft`): online RL on the forward process, no log-probs.

Rollouts are sampled by the *old* policy `θ_old` with any deterministic sampler (the pipeline's own,
CFG-free by default as the paper trains). `θ_old` is a moving average of the trained weights,
updated after every optimizer step with the decay `min(old_decay_rate · step, old_decay_max)`
(NVlabs' default schedule: 0.001 per step up to 0.5): early on it follows the policy closely.

Training sees only the clean samples `x₀` and their group-normalised advantages, turned into
optimality probabilities `r = clamp(clip(A, ±A_max)/(2·A_max) + ½, 0, 1)`. For each sample,
`timesteps_per_sample` forward-process points `x_σ = noise.add_noise(x₀, ε, σ)` are drawn (the
model's training σ law), and the loss (`mmalign.losses.diffusion_nft_loss`, the paper's velocity
form) fits the implicit positive policy `β·v_θ + (1 − β)·v_old` to the sample where `r` is high and
the implicit negative policy `(1 + β)·v_old − β·v_θ` where it is low. On ε / v models the same loss
runs in the model's prediction space (its target is the forward process's).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmalign.config import check_range, option
from mmalign.losses import diffusion_nft_loss, nft_optimality
from mmalign.models.state import named_parameters
from mmalign.models.trajectory import Trajectory
from mmalign.train.diffusion_rl import DiffusionRLConfig, DiffusionRLMethod, RolloutBatch
from mmalign.train.ema import EMA
from mmalign.train.rng import keyed_generator

OLD_PREFIX = "old/"


class OldPolicy(EMA):
    """The sampling policy of DiffusionNFT: an average whose decay grows linearly to a ceiling."""

    def __init__(self, params, rate: float, ceiling: float, module: torch.nn.Module | None = None):
        super().__init__(params, max_decay=ceiling, module=module)
        self.rate = rate

    def decay(self, step: int) -> float:
        return min(self.rate * step, self.max_decay)


@dataclass
class DiffusionNFTConfig(DiffusionRLConfig):
    """Options of `diffusion-nft` (section `diffusion_nft`); `train.batch_size` counts prompts per micro-batch."""

    beta: float = option("β of the implicit policies (the step towards positives / away from negatives)", default=1.0)
    advantage_clip: float = option("A_max: advantages are clipped to ±A_max before r = A/(2·A_max) + ½", default=5.0)
    timesteps_per_sample: int = option("forward-process points drawn per sample and update", default=2)
    old_decay_rate: float = option("the old policy's decay grows by this per optimizer step …", default=0.001)
    old_decay_max: float = option("… up to this ceiling (0 = the old policy is the current one)", default=0.5)

    def check_values(self, prefix: str) -> None:
        super().check_values(prefix)
        check_range(f"{prefix}beta", self.beta, 0, open_low=True)
        check_range(f"{prefix}advantage_clip", self.advantage_clip, 0, open_low=True)
        check_range(f"{prefix}timesteps_per_sample", self.timesteps_per_sample, 1)
        check_range(f"{prefix}old_decay_rate", self.old_decay_rate, 0)
        check_range(f"{prefix}old_decay_max", self.old_decay_max, 0, 1)


class DiffusionNFT(DiffusionRLMethod):
    config_class = DiffusionNFTConfig
    config: DiffusionNFTConfig

    def average_parameters(self, denoiser: torch.nn.Module) -> None:
        super().average_parameters(denoiser)
        c = self.config
        params = [p for p in named_parameters(denoiser).values() if p.requires_grad]
        self.old = OldPolicy(params, c.old_decay_rate, c.old_decay_max, module=denoiser)
        self.averages[OLD_PREFIX] = self.old

    def generate(self, prompts: list[str]) -> tuple[torch.Tensor, Trajectory | None]:
        c = self.config
        noise = torch.randn(self.sample_shape(len(prompts)), generator=self.rollout_generator("rollout"))
        with self.old.applied():
            latents = self.model.sample(
                prompts,
                num_steps=c.num_steps,
                guidance_scale=c.guidance_scale,
                guidance_scale_2=c.guidance_scale_2,
                noise=noise,
                resolution=self.resolution,
                num_frames=self.num_frames,
            )
        return latents, None

    def compute_loss(self, batch: RolloutBatch, step: int, micro: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c, model = self.config, self.model
        k = c.timesteps_per_sample
        x0 = batch.latents.repeat_interleave(k, dim=0)
        r = nft_optimality(batch.advantages, c.advantage_clip).repeat_interleave(k)
        generator = keyed_generator(self.run.seed, step, batch.index, self.process_index, "nft")
        noise = torch.randn(x0.shape, generator=generator).to(x0.device)
        t = model.noise.sample_timesteps(x0.shape[0], generator).to(x0.device)
        x_t = model.noise.add_noise(x0, noise, t)
        cond = model.encode_prompt(batch.prompts, self.resolution).repeat(k)
        with (
            torch.no_grad(),
            self.old.applied(),
        ):  # before the policy's forward: swapping weights under a graph breaks it
            v_old = model.predict(x_t, t, cond)
        v = model.predict(x_t, t, cond)
        loss, metrics = diffusion_nft_loss(v, v_old, model.noise.target(x0, noise, t), r, c.beta)
        return loss, {**batch.stats, **metrics, "old_decay": torch.tensor(self.old.decay(step))}
