"""The balls world's physics gold metric as a video `Reward` (see `mmalign.data.balls_world`).

Scores lie in (0, 1]: `exp(−mean error)` of the ball's frame-to-frame acceleration against
gravity, floor contacts excluded, frames without a ball charged the worst error. It reads
pixels only, so it judges any generator of this world. Training objectives must never use it.
"""

from __future__ import annotations

import numpy as np
import torch

from mmalign.data import balls_world
from mmalign.rewards.video import VideoReward


class BallsPhysics(VideoReward):
    name = "balls-physics"
    needs_prompts = False

    def __init__(self, fps: float = balls_world.FPS, device: str | torch.device = "cpu"):
        self.fps = fps

    def _checks(self, videos: torch.Tensor) -> list[dict]:
        clips = (videos.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 4, 1).cpu().numpy()
        return [balls_world.physics_checks(c, self.fps) for c in clips]

    def score_batch(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        return torch.tensor([c["physics"] for c in self._checks(images)], dtype=torch.float32)

    def breakdown(self, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
        """Share of frames showing the ball, averaged over the clips."""
        return {"visible": float(np.mean([c["visible"] for c in self._checks(images)]))}
