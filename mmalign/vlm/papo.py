"""PAPO (`method: papo`): GRPO plus the implicit perception loss and double entropy regularisation.

For every prompt one masked copy of each image is drawn (`mask_patches`: P×P squares from the
top-left, each zeroed with probability p; shared by the prompt's whole group, the image size kept,
so `input_ids` are identical). The policy's log-probs of its own sampled tokens under the masked
images, `ℓᵐ`, are computed once per rollout with the sampling weights (no gradient; PAPO's
released default) or, with `recompute_masked`, at every loss with gradient (one extra forward).
The loss is `mmalign.losses.papo_loss` on top of GRPO's. Logged collapse monitors: perception KL,
its variance over tokens, the NLL (entropy estimates) under real and masked images, and the
policy's entropy under both.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from mmalign.config import check_range, option
from mmalign.losses import papo_loss
from mmalign.models.vlm import PromptBatch
from mmalign.vlm.grpo import GRPO, GroupBatch, GRPOConfig


def mask_patches(image: Image.Image, patch: int, ratio: float, rng: np.random.Generator) -> Image.Image:
    """A copy of `image` with each `patch`×`patch` square (a grid from the top-left; edge squares
    partial) set to black with probability `ratio`. Size and mode are kept; the input is untouched."""
    pixels = np.array(image)
    rows, cols = -(-pixels.shape[0] // patch), -(-pixels.shape[1] // patch)
    dropped = rng.random((rows, cols)) < ratio
    full = np.repeat(np.repeat(dropped, patch, axis=0), patch, axis=1)[: pixels.shape[0], : pixels.shape[1]]
    pixels[full] = 0
    return Image.fromarray(pixels, mode=image.mode)


@dataclass
class PAPOConfig(GRPOConfig):
    """Options of `papo` (section `papo`): GRPO's plus the perception and entropy terms."""

    gamma: float = option(
        "weight γ of the perception KL (maximised); the paper: 0.01–0.02, 0.04 collapses", default=0.01
    )
    entropy_weight: float = option("η₁: weight of the policy's NLL under the real image", default=0.03)
    masked_entropy_weight: float = option("η₂: weight of the NLL under the masked image", default=0.03)
    mask_patch: int = option("side P of the masked squares, in pixels of the raw image", default=14)
    mask_ratio: float = option("probability p that a square is blacked out", default=0.6)
    recompute_masked: bool = option("recompute masked log-probs with gradient at every loss", default=False)

    def check_values(self, prefix: str) -> None:
        super().check_values(prefix)
        for key in ("gamma", "entropy_weight", "masked_entropy_weight"):
            check_range(f"{prefix}{key}", getattr(self, key), 0)
        check_range(f"{prefix}mask_patch", self.mask_patch, 1)
        check_range(f"{prefix}mask_ratio", self.mask_ratio, 0, 1)


class PAPO(GRPO):
    config_class = PAPOConfig
    config: PAPOConfig

    def masked_images(self, prompts: PromptBatch) -> list[list[Image.Image]]:
        """One masked copy of each prompt's images (the rollout's prompts hold each prompt G times in a row),
        repeated over its group; seeded by the global RNG."""
        c = self.config
        rng = np.random.default_rng(int(torch.randint(0, 2**62, ())))
        per_prompt = [
            [mask_patches(im, c.mask_patch, c.mask_ratio, rng) for im in conversation.images]
            for conversation in prompts.conversations[:: c.num_generations]
        ]
        return [images for images in per_prompt for _ in range(c.num_generations)]

    @torch.no_grad()
    def rollout(self, questions: list) -> GroupBatch:
        batch = super().rollout(questions)
        r = batch.rollout
        batch.extras["masked_prompts"] = self.vlm.with_images(r.prompts, self.masked_images(r.prompts))
        logp_masked, entropy_masked = self.vlm.token_logprobs(
            batch.extras["masked_prompts"],
            r.completion_ids,
            r.completion_mask,
            temperature=self.config.temperature,
            with_entropy=True,
        )
        batch.extras["logp_masked"] = logp_masked
        mask = r.completion_mask
        batch.stats["entropy_masked"] = (entropy_masked * mask).sum() / mask.sum().clamp(min=1)
        return batch

    def compute_loss(self, batch: GroupBatch, step: int, micro: int):
        c = self.config
        policy_loss, metrics, logp = self.policy_loss(batch)
        logp_masked = batch.extras["logp_masked"]
        if c.recompute_masked:
            r = batch.rollout
            logp_masked, _ = self.vlm.token_logprobs(
                batch.extras["masked_prompts"],
                r.completion_ids,
                r.completion_mask,
                temperature=c.temperature,
                model=self.module,
            )
        loss, papo_metrics = papo_loss(
            policy_loss,
            logp,
            logp_masked,
            batch.rollout.completion_mask,
            gamma=c.gamma,
            entropy_weight=c.entropy_weight,
            masked_entropy_weight=c.masked_entropy_weight,
        )
        return loss, {**metrics, **papo_metrics}
