"""The balls world's metrics as video `Reward`s (see `mmalign.data.balls_world`).

`balls-physics`, the gold metric, scores in (0, 1]: `exp(−mean error)` of the ball's frame-to-frame acceleration against
gravity, floor contacts excluded, frames without a ball charged the worst error. It reads
pixels only, so it judges any generator of this world. Training objectives must never use it.

`balls-colour` is the share of the frames showing the ball whose ball has the caption's colour: the
physics metric is blind to colour, so evaluations report both (a run that raises physics while
the balls turn the wrong colour has traded caption fidelity for the gold metric).
"""

from __future__ import annotations

import numpy as np
import torch

from mmalign.data import balls_world
from mmalign.rewards.base import RewardInputError
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


class BallsColour(VideoReward):
    name = "balls-colour"
    needs_prompts = True

    def __init__(self, device: str | torch.device = "cpu"):
        """`device` is accepted like every reward's; the check runs on the CPU."""

    def score_batch(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        clips = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 4, 1).cpu().numpy()
        scores = []
        for clip, prompt in zip(clips, prompts):
            try:
                scores.append(balls_world.colour_match(clip, prompt))
            except ValueError as error:
                raise RewardInputError(f"{self.name}: {error}") from None
        return torch.tensor(scores, dtype=torch.float32)
