"""Any image reward on videos (sampled frames) and on meshes (rendered views).

`VideoFrames(reward, frames=8, pool="mean")` scores a clip `(3, T, H, W)` by sampling `frames`
frames evenly spaced over the clip — indices `round(linspace(0, T − 1, frames))`, so the first and
last frame are always in; a clip of `T ≤ frames` frames gives all of them — scoring each frame with
the clip's prompt, and pooling the frame scores by `mean` or `min` (the worst frame). The frame rate
of the file plays no part: a 2 s and a 10 s clip both contribute `frames` frames.

`mmalign.mesh.views.MeshViews(reward, views=4, size=224, elevation=25, pool="mean")` renders each mesh with the
toolkit's software rasteriser (`mmalign.mesh.render`: numpy only, headless, CPU; flat-shaded
grey-blue front faces, orange back faces, white background, orthographic, mesh in the unit box)
from `views` azimuths evenly spaced around the vertical axis starting at 35° (4 views: 35°, 125°,
215°, 305°), `elevation` degrees above the horizon, each view a `size × size` image scored with the
mesh's prompt; the view scores are pooled by `mean` or `min`. The renderer draws no texture or
vertex colour, so a reward only sees shape and shading.

By name: `load_reward("video:clip-score", frames=4, pool="min")` and
`load_reward("mesh-views:clip-score", views=6)` (the remaining keyword arguments go to the inner
reward). A plain image reward routes a video input (a `(N, 3, T, H, W)` tensor, `(3, T, H, W)`
tensors in a list, `(T, H, W, 3)` arrays, video files other than GIF) through `VideoFrames` and a mesh
input (trimesh objects, mesh files) through `MeshViews` with the defaults above, so
`mmalign.score(videos, prompts, reward="clip-score")` works as it is. A GIF path counts as an image
for a plain image reward (its first frame); name `video:<reward>` to score it as a clip.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmalign.data.video import VIDEO_SUFFIXES
from mmalign.registry import import_string
from mmalign.rewards.base import Reward, RewardInputError, broadcast_prompts
from mmalign.rewards.video import VideoReward, as_video_batch

POOLS = ("mean", "min")
MESH_SUFFIXES = (".obj", ".glb", ".gltf", ".ply", ".stl", ".off")  # mmalign.mesh.io.SUFFIXES, without importing trimesh
#: video file suffixes a plain image reward reads as clips (GIF stays an image there)
CLIP_ONLY_SUFFIXES = tuple(s for s in VIDEO_SUFFIXES if s != ".gif")


def media_kind(samples: Any) -> str:
    """`"video"`, `"mesh"` or `"image"`: what kind of input `samples` is, judged by its first item."""
    if isinstance(samples, torch.Tensor):
        return "video" if samples.ndim == 5 else "image"
    if isinstance(samples, np.ndarray):  # one array: an (H, W, 3) image or a (T, H, W, 3) clip
        return "video" if samples.ndim == 4 else "image"
    first = samples
    if isinstance(samples, (list, tuple)):
        if not samples:
            return "image"
        first = samples[0]
    if isinstance(first, (str, Path)):
        suffix = Path(first).suffix.lower()
        return "video" if suffix in CLIP_ONLY_SUFFIXES else "mesh" if suffix in MESH_SUFFIXES else "image"
    if isinstance(first, (torch.Tensor, np.ndarray)) and first is not samples and first.ndim == 4:
        return "video"
    if type(first).__module__.startswith("trimesh"):
        return "mesh"
    return "image"


def pool_scores(scores: torch.Tensor, counts: Sequence[int], pool: str) -> torch.Tensor:
    """Per-item scores `(len(counts),)` from consecutive runs of `scores (sum(counts),)` pooled by mean or min."""
    parts = torch.split(scores, list(counts))
    return torch.stack([part.mean() if pool == "mean" else part.min() for part in parts])


def check_pool(pool: str) -> str:
    if pool not in POOLS:
        raise RewardInputError(f"pool={pool!r}: expected one of {', '.join(POOLS)}")
    return pool


def frame_indices(length: int, frames: int) -> list[int]:
    """Indices of the `frames` frames sampled evenly over a clip of `length` frames (all if `length ≤ frames`)."""
    if length <= frames:
        return list(range(length))
    return [int(i) for i in np.round(np.linspace(0, length - 1, frames))]


def image_reward(reward: Reward, wrapper: str) -> Reward:
    if getattr(reward, "file_kind", "image") != "image":
        raise RewardInputError(f"{wrapper} takes an image reward; {reward.name!r} scores {reward.file_kind}s")
    return reward


class VideoFrames(VideoReward):
    """An image reward on clips: `frames` evenly spaced frames, each scored, pooled by `pool` (see module doc).

    Args:
        reward: the image reward that scores each frame.
        frames: frames sampled per clip (≥ 1).
        pool: `mean` or `min` of the frame scores.
    """

    def __init__(self, reward: Reward, frames: int = 8, pool: str = "mean"):
        if int(frames) < 1:
            raise RewardInputError(f"frames={frames}: sample at least 1 frame per clip")
        self.reward, self.frames, self.pool = image_reward(reward, "video:"), int(frames), check_pool(pool)
        self.name = f"video:{reward.name}"
        self.needs_prompts = reward.needs_prompts

    def __call__(
        self, samples: Any, prompts: str | Sequence[str] | None = None, progress: bool | None = None
    ) -> torch.Tensor:
        """Score clips (see `VideoReward` for the input kinds) → `(N,)` pooled frame scores."""
        clips = as_video_batch(samples)
        prompt_list = broadcast_prompts(prompts, len(clips), self.needs_prompts)
        if len(clips) == 0:
            return torch.zeros(0)
        picks = [frame_indices(clip.shape[1], self.frames) for clip in clips]
        counts = [len(p) for p in picks]
        if isinstance(clips, torch.Tensor):  # one length: gather every clip's frames in one tensor
            frames: Any = clips[:, :, picks[0]].permute(0, 2, 1, 3, 4).flatten(0, 1)
        else:
            frames = [clip[:, i] for clip, pick in zip(clips, picks) for i in pick]
        frame_prompts = None if prompt_list is None else [p for p, c in zip(prompt_list, counts) for _ in range(c)]
        return pool_scores(self.reward(frames, frame_prompts, progress), counts, self.pool)

    def score_batch(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        """`videos (N, 3, T, H, W)` in [0, 1] → `(N,)` pooled frame scores."""
        return self(images, prompts)


#: name prefix → "module:Class" of its wrapper and the keyword arguments it takes (the rest go to the
#: inner reward); the mesh wrapper lives in the mesh package, imported by string when used
WRAPPERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "video:": ("mmalign.rewards.media:VideoFrames", ("frames", "pool")),
    "mesh-views:": ("mmalign.mesh.views:MeshViews", ("views", "size", "elevation", "pool")),
}


def wrapper_class(prefix: str) -> type[Reward]:
    """The wrapper class of a `video:` / `mesh-views:` name prefix."""
    return import_string(WRAPPERS[prefix][0])
