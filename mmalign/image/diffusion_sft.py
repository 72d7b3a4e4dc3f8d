"""Supervised fine-tuning on the preferred image of each pair: the plain denoising loss.

The DPO papers' SFT baseline, and the reference point of `benchmarks/dpo_step.py`. With
`both_images: true` it trains on both images of each pair (the same 2B images a DPO step sees).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mmalign.losses import per_sample_mse
from mmalign.train.diffusion_method import DiffusionPairMethod


@dataclass
class DiffusionSFTConfig:
    both_images: bool = field(default=False, metadata={"help": "train on winner and loser (not only the winner)"})


class DiffusionSFT(DiffusionPairMethod):
    config_class = DiffusionSFTConfig
    config: DiffusionSFTConfig
    needs_reference = False

    def compute_loss(self, batch: dict[str, Any], step: int, micro: int):
        roles = ("w", "l") if self.config.both_images else ("w",)
        x0, noise, t, x_t = self.noise_latents(self.clean_latents(batch, roles, step), batch["index"], step)
        cond = self.conditioning(batch["prompt"], len(roles))
        err = per_sample_mse(self.model.predict(x_t, t, cond), self.model.noise.target(x0, noise, t))
        return err.mean(), {"mse": err.mean().detach()}
