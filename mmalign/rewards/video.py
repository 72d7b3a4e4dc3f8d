"""Video rewards: the `Reward` protocol over clips, scoring per time segment, and a rule-based judge.

A video reward's `score_batch` takes `videos (N, 3, F, H, W)` in [0, 1]. Samples may be that
tensor, `(F, H, W, 3)` uint8 arrays, `(3, F, H, W)` tensors or video file paths (MP4, GIF, …).

`segment_scores(reward, video, fps, segment_seconds)` applies any video reward to each time
segment of a clip (the sub-clip of its frames), which is how DenseDPO's reward labeller judges
segments. `MotionSmoothness` (`motion-smoothness`) is a generic rule-based judge: it tracks the
moving foreground (pixels away from the clip's temporal median and from their frame's median
colour) and scores how smooth
its centroid path is, `exp(−mean of the smaller half of |jerk| / scale)` (jerk = third
difference, px/frame³; the few jerks of a collision do not count). It knows nothing about gravity, so it differs from
the balls world's physics gold metric.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmalign.data.segments import pixel_segment_bounds
from mmalign.data.video import VIDEO_SUFFIXES, VideoError, read_video
from mmalign.rewards.base import Reward, RewardInputError


def to_video_tensor(sample: Any, where: str = "sample") -> torch.Tensor:
    """One clip → `(3, F, H, W)` float in [0, 1]."""
    if isinstance(sample, (str, Path)):
        try:
            sample = read_video(sample).frames
        except VideoError as error:
            raise RewardInputError(str(error)) from None
    if isinstance(sample, np.ndarray):
        if sample.ndim != 4 or sample.shape[-1] != 3:
            raise RewardInputError(f"{where}: expected an (F, H, W, 3) video array, got shape {sample.shape}")
        scale = 255.0 if sample.dtype == np.uint8 else 1.0
        return torch.from_numpy(np.array(sample)).permute(3, 0, 1, 2).float() / scale
    if isinstance(sample, torch.Tensor):
        if sample.ndim != 4 or sample.shape[0] != 3:
            raise RewardInputError(f"{where}: expected a (3, F, H, W) video tensor, got shape {tuple(sample.shape)}")
        return sample.float()
    raise RewardInputError(f"{where}: cannot score an object of type {type(sample).__name__} as a video")


def as_video_batch(samples: Any) -> list[torch.Tensor] | torch.Tensor:
    """A `(N, 3, F, H, W)` tensor passes through; anything else becomes a list of `(3, F, H, W)`."""
    if isinstance(samples, torch.Tensor) and samples.ndim == 5:
        if samples.shape[1] != 3:
            raise RewardInputError(f"expected an (N, 3, F, H, W) video tensor, got shape {tuple(samples.shape)}")
        return samples.float()
    if isinstance(samples, (str, Path, np.ndarray, torch.Tensor)):
        samples = [samples]
    return [to_video_tensor(s, str(s) if isinstance(s, (str, Path)) else f"sample {i}") for i, s in enumerate(samples)]


class VideoReward(Reward):
    """Base of rewards on clips: `score_batch(videos (N, 3, F, H, W) in [0, 1], prompts) -> (N,)`.

    Lists of clips are scored one clip at a time (clips may differ in length and size)."""

    batch_size = 1
    file_suffixes = VIDEO_SUFFIXES  # what `mmalign score` collects from folders
    file_kind = "video"

    def as_batch(self, samples: Any) -> list[torch.Tensor] | torch.Tensor:
        return as_video_batch(samples)


def segment_scores(
    reward: Reward, videos: torch.Tensor, fps: float, segment_seconds: float, prompts: list[str] | None = None
) -> torch.Tensor:
    """Scores `(N, S)` of each time segment of `videos (N, 3, F, H, W)`: the reward's own
    `segment_scores` when it has one (it may look at the whole clip), else the reward of each sub-clip."""
    if hasattr(reward, "segment_scores"):
        return reward.segment_scores(videos, fps, segment_seconds)
    bounds = pixel_segment_bounds(videos.shape[2], fps, segment_seconds)
    columns = [reward(videos[:, :, start:stop], prompts) for start, stop in bounds]
    return torch.stack(columns, dim=1)


def window_segments(frames: int, span: int, fps: float, segment_seconds: float) -> list[np.ndarray]:
    """Per time segment, a mask `(frames − span + 1,)` of the sliding windows of `span` frames (window
    `t` covers frames `t … t+span−1`) whose centre lies in the segment; every window counts once."""
    centres = np.arange(frames - span + 1) + (span - 1) / 2
    return [(centres >= start) & (centres < stop) for start, stop in pixel_segment_bounds(frames, fps, segment_seconds)]


def foreground_track(frames: np.ndarray, threshold: float = 0.15) -> np.ndarray:
    """Centroid `(F, 2)` (x, y) of the moving foreground of `frames (F, H, W, 3)` in [0, 1]: pixels
    that differ by more than `threshold` both from the clip's per-pixel temporal median (so static
    scenery drops out) and from their frame's median colour (so the trail an object leaves in the
    temporal median does not count); NaN where a frame has none."""
    moving = np.abs(frames - np.median(frames, axis=0)).mean(-1)
    salient = np.abs(frames - np.median(frames, axis=(1, 2), keepdims=True)).mean(-1)
    weight = np.clip(np.minimum(moving, salient) - threshold, 0, None)  # (F, H, W)
    mass = weight.sum(axis=(1, 2))
    ys, xs = np.mgrid[0 : frames.shape[1], 0 : frames.shape[2]] + 0.5
    with np.errstate(invalid="ignore", divide="ignore"):
        track = np.stack([(weight * xs).sum((1, 2)) / mass, (weight * ys).sum((1, 2)) / mass], axis=1)
    track[mass < 1e-3] = np.nan
    return track


class MotionSmoothness(VideoReward):
    """`exp(−low-half mean |jerk| / scale)` of the moving foreground's centroid: the mean of the
    smaller half of the jerks, so the few jerks of a collision do not count; windows where the
    foreground vanishes count `missing_jerk` px. Per segment (`segment_scores`), the track is
    measured on the whole clip and each jerk counts for the segment holding its window's centre.
    Fewer than 4 frames score NaN."""

    name = "motion-smoothness"
    needs_prompts = False

    def __init__(
        self, scale: float = 1.0, threshold: float = 0.1, missing_jerk: float = 8.0, device: str | torch.device = "cpu"
    ):
        self.scale, self.threshold, self.missing_jerk = scale, threshold, missing_jerk

    def jerks(self, frames: np.ndarray) -> np.ndarray:
        """`|jerk|` per 4-frame window `(F − 3,)`; a window with a frame that shows no foreground (the
        object vanished) counts `missing_jerk`."""
        track = foreground_track(frames, self.threshold)
        jerks = np.linalg.norm(np.diff(track, n=3, axis=0), axis=1)
        return np.where(np.isnan(jerks), self.missing_jerk, jerks)

    def score_jerks(self, jerks: np.ndarray) -> float:
        if len(jerks) == 0:
            return float("nan")
        low = np.sort(jerks)[: max(1, len(jerks) // 2)]
        return float(np.exp(-low.mean() / self.scale))

    def score_batch(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        clips = images.clamp(0, 1).permute(0, 2, 3, 4, 1).cpu().numpy()
        return torch.tensor([self.score_jerks(self.jerks(c)) for c in clips], dtype=torch.float32)

    def segment_scores(self, videos: torch.Tensor, fps: float, segment_seconds: float) -> torch.Tensor:
        masks = window_segments(videos.shape[2], 4, fps, segment_seconds)
        out = torch.full((len(videos), len(masks)), float("nan"))
        for i, frames in enumerate(videos.clamp(0, 1).permute(0, 2, 3, 4, 1).cpu().numpy()):
            jerks = self.jerks(frames)
            for s, inside in enumerate(masks):
                out[i, s] = self.score_jerks(jerks[inside])
        return out
