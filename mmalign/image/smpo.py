"""SmPO-Diffusion (Lu et al., ICML 2025): smoothed preferences and ReNoise-inverted training latents.

Two changes on top of Diffusion-DPO:

1. **Smoothed preference.** A reward scores both images of every pair once at setup;
   `p = σ((r_w − r_l)/τ)` and the pair's DPO margin is multiplied by `γ(2p − 1)`
   (`mmalign.losses.smpo_pair_scale`). A pair the reward finds equally good (p = ½) contributes
   the constant `log 2` and no gradient. The data set's order is kept: where the reward disagrees
   with the label, p < ½ and the negative scale flips the pair, which is exactly SmPO's
   "winner = the higher-scored image" (swapping w/l negates both the margin and the scale).
2. **Trajectory estimate.** `x_t` comes from ReNoise inversion of the clean latent with the current
   policy (no guidance, no graph) on a grid ending at the sampled `t`; the regression target uses
   the noise implied by the inverted latent (`mmalign.models.inversion`). `inversion: ddim` drops
   the ReNoise iterations, `inversion: forward` uses Diffusion-DPO's fresh Gaussian noise (ablation).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from mmalign.config import ConfigError, check_choice, check_range, option
from mmalign.image.diffusion_dpo import DiffusionDPO, DiffusionDPOConfig
from mmalign.losses import smpo_pair_scale, soft_preference
from mmalign.models.families import Conditioning
from mmalign.models.inversion import implied_noise
from mmalign.rewards import load_reward

INVERSIONS = ("renoise", "ddim", "forward")


@dataclass
class SmPOConfig(DiffusionDPOConfig):
    gamma: float = option("sensitivity γ: the margin is scaled by γ(2p − 1) (10 in the paper)", 10.0)
    label_reward: str = option("reward that gives the soft labels (PickScore in the paper)", "clip-score")
    label_reward_args: dict[str, Any] = option(
        "keyword arguments of the label reward, e.g. {path: yuvalkirstain/PickScore_v1}", default_factory=dict
    )
    tau: float | None = option("temperature of p = σ(Δr/τ); null = the reward's range over the training pairs", None)
    inversion: str = option("renoise (SmPO), ddim (no ReNoise iterations) or forward (DPO noising)", "renoise")
    inversion_steps: int = option("inversion steps from 0 to t (5 for SD1.5, 10 for SDXL in the paper's code)", 5)
    renoise_iterations: int = option("ReNoise fixed-point iterations per step; the estimates are averaged", 1)
    official_grid: bool = option(
        "use SmPO's code grid {1, 1+T/n, …} below t instead of a grid ending at t; unlike that code, the first step "
        "starts from the clean latent at ᾱ = 1, not from ᾱ_0 = 0.99915 (SD's first timestep)",
        False,
    )

    def check_values(self, prefix: str) -> None:
        super().check_values(prefix)
        check_range(f"{prefix}gamma", self.gamma, 0)
        check_range(f"{prefix}tau", self.tau, 0, open_low=True)
        check_choice(f"{prefix}inversion", self.inversion, INVERSIONS)
        check_range(f"{prefix}inversion_steps", self.inversion_steps, 1)
        check_range(f"{prefix}renoise_iterations", self.renoise_iterations, 0)


class SmPO(DiffusionDPO):
    config_class = SmPOConfig
    config: SmPOConfig

    def setup(self, accelerator) -> None:
        super().setup(accelerator)
        self.score_w, self.score_l = self.score_pairs()
        scores = torch.cat([self.score_w, self.score_l])
        self.tau = self.config.tau if self.config.tau is not None else float(scores.max() - scores.min())
        if self.tau <= 0:
            raise ConfigError(
                f"smpo.label_reward {self.config.label_reward!r} gives every training image the same score; "
                "set smpo.tau or another label_reward"
            )
        self.p = soft_preference(self.score_w, self.score_l, self.tau)  # (N,), winner = data set's first image

    @torch.no_grad()
    def score_pairs(self, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Label-reward scores of every pair's (first, second) image: two `(N,)` tensors."""
        reward = load_reward(self.config.label_reward, device=self.device, **self.config.label_reward_args)
        score_w, score_l = [], []
        n = len(self.pairs)
        for start in tqdm(range(0, n, batch_size), desc=f"soft labels ({self.config.label_reward})", unit="batch"):
            indices = range(start, min(n, start + batch_size))
            pairs = [self.pairs.pair_images(i) for i in indices]
            prompts = [self.pairs.records[i].prompt for i in indices]
            score_w.append(reward([w.convert("RGB") for w, _ in pairs], prompts).float().cpu())
            score_l.append(reward([lo.convert("RGB") for _, lo in pairs], prompts).float().cpu())
        return torch.cat(score_w), torch.cat(score_l)

    def training_latents(
        self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, x_t: torch.Tensor, cond: Conditioning
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(x_t, noise)`: forward-noised, or inverted with the noise the inverted latent implies."""
        if self.config.inversion == "forward":
            return x_t, noise
        inverted = self.model.invert(
            x0,
            t,
            cond,
            steps=self.config.inversion_steps,
            renoise_iterations=self.config.renoise_iterations if self.config.inversion == "renoise" else 0,
            average_window=(0, self.config.renoise_iterations + 1),
            official_grid=self.config.official_grid,
        )
        return inverted, implied_noise(self.model.noise, inverted, x0, t)

    def pair_scale(self, index: torch.Tensor) -> torch.Tensor:
        """`γ(2p − 1)` of the pairs in the batch, `(B,)`."""
        return smpo_pair_scale(self.p[index.cpu()], self.config.gamma).to(self.device)
