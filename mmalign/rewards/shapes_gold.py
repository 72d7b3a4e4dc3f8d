"""The shapes world's gold metric as a `Reward` (see `mmalign.data.shapes_world.gold_checks`).

Scores lie in [0, 1]: the share of checks (colours present, shapes right, object count,
relation) an image passes for its caption. It reads pixels only, so it is a fair judge of any
generator of this world. Training objectives must never use it.
"""

from __future__ import annotations

import numpy as np
import torch

from mmalign.data import shapes_world
from mmalign.rewards.base import Reward, RewardInputError

CHECKS = ("colour", "shape", "count", "relation", "all")


class ShapesGold(Reward):
    name = "shapes-gold"

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)  # image analysis runs on the CPU; kept for the common signature

    def _checks(self, images: torch.Tensor, prompts: list[str]) -> list[dict[str, float]]:
        arrays = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
        out = []
        for i, (image, prompt) in enumerate(zip(arrays, prompts)):
            try:
                out.append(shapes_world.gold_checks(image, prompt))
            except ValueError as exc:
                raise RewardInputError(f"sample {i}: {exc}") from None
        return out

    def score_batch(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        return torch.tensor([c["score"] for c in self._checks(images, prompts or [])], dtype=torch.float32)

    def breakdown(self, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        """Mean of each check over the batch (`relation` over two-shape captions only)."""
        checks = self._checks(images, prompts)
        return {k: float(np.mean([c[k] for c in checks if k in c])) for k in CHECKS if any(k in c for c in checks)}
