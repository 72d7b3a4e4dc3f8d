"""Diffusion-DPO (Wallace et al., CVPR 2024) on the shared trainer.

For each pair, winner and loser latents are noised with the same ε and t; the trainable model
must lower its denoising error on the winner relative to the frozen reference more than on the
loser: `loss = −log σ(−β [(e_θ(w) − e_ref(w)) − (e_θ(l) − e_ref(l))])` with mean-reduced
errors (see `mmalign.losses.diffusion_dpo_loss`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mmalign.config import check_choice, check_range, option
from mmalign.losses import diffusion_dpo_loss, per_sample_mse
from mmalign.models.families import Conditioning
from mmalign.train.diffusion_method import DiffusionPairMethod
from mmalign.train.rng import keyed_generator


@dataclass
class DiffusionDPOConfig:
    beta: float = option("β multiplying mean-reduced errors (2500 for SD1.5 in the diffusers convention)", 2500.0)
    beta_convention: str = option(
        "plain: β as given (diffusers example); salesforce_half: the effective β is β/2 (Salesforce code, "
        "whose launchers pass 5000)",
        "plain",
    )
    sft_weight: float = option("weight of an added plain denoising loss on the winners (0 = pure DPO)", 0.0)
    prompt_dropout: float = option(
        "probability of training a pair with the empty prompt; 0 by default (the embedded recipes measure "
        "without it), where the Diffusion-DPO and SmPO reference launchers use 0.2 for SD1.5 and SDXL",
        0.0,
    )

    def check_values(self, prefix: str) -> None:
        """Ranges and choices, checked when the config is built (keys named under `prefix`)."""
        check_range(f"{prefix}beta", self.beta, 0, open_low=True)
        check_choice(f"{prefix}beta_convention", self.beta_convention, ("plain", "salesforce_half"))
        check_range(f"{prefix}sft_weight", self.sft_weight, 0)
        check_range(f"{prefix}prompt_dropout", self.prompt_dropout, 0, 1)

    @property
    def effective_beta(self) -> float:
        if self.beta_convention not in ("plain", "salesforce_half"):
            raise ValueError(
                f"diffusion_dpo.beta_convention must be plain or salesforce_half, got {self.beta_convention!r}"
            )
        return self.beta / 2 if self.beta_convention == "salesforce_half" else self.beta


class DiffusionDPO(DiffusionPairMethod):
    config_class = DiffusionDPOConfig
    config: DiffusionDPOConfig

    def prompts_with_dropout(self, prompts: list[str], index: torch.Tensor, step: int) -> list[str]:
        p = self.config.prompt_dropout
        if p <= 0:
            return prompts
        draws = [
            float(torch.rand(1, generator=keyed_generator(self.run.seed, step, int(i), "prompt")))
            for i in index.tolist()
        ]
        return ["" if d < p else prompt for d, prompt in zip(draws, prompts)]

    def training_latents(
        self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, x_t: torch.Tensor, cond: Conditioning
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(x_t, noise)` the errors are measured at: the forward-noised latents here (SmPO inverts)."""
        return x_t, noise

    def pair_scale(self, index: torch.Tensor) -> torch.Tensor | None:
        """Per-pair multiplier of the DPO margin, `(B,)`; None (all ones) for Diffusion-DPO."""
        return None

    def compute_loss(self, batch: dict[str, Any], step: int, micro: int):
        index, n = batch["index"], len(batch["prompt"])
        x0, noise, t, x_t = self.noise_latents(self.clean_latents(batch, ("w", "l"), step), index, step)
        prompts = self.prompts_with_dropout(batch["prompt"], index, step)
        cond = self.conditioning(prompts, 2)
        x_t, noise = self.training_latents(x0, noise, t, x_t, cond)
        target = self.model.noise.target(x0, noise, t)
        err = per_sample_mse(self.model.predict(x_t, t, cond), target)
        ref_err = per_sample_mse(self.model.predict_reference(x_t, t, cond), target)
        scale = self.pair_scale(index)
        loss, metrics = diffusion_dpo_loss(
            err[:n], err[n:], ref_err[:n], ref_err[n:], beta=self.config.effective_beta, pair_scale=scale
        )
        if scale is not None:
            metrics["pair_scale"] = scale.detach().mean()
        if self.config.sft_weight:
            loss = loss + self.config.sft_weight * err[:n].mean()
        return loss, metrics
