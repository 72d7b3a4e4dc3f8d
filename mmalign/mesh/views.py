"""Any image reward on meshes: rendered views of each mesh, scored and pooled.

`load_reward("mesh-views:<image reward>", views=, size=, elevation=, pool=)` builds it, and a plain
image reward routes mesh inputs here (`mmalign.rewards.media` documents the views and pooling).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmalign.mesh.io import load_mesh
from mmalign.mesh.render import render_mesh
from mmalign.mesh.reward import as_mesh_list
from mmalign.rewards.base import Reward, RewardInputError, broadcast_prompts
from mmalign.rewards.media import MESH_SUFFIXES, check_pool, image_reward, pool_scores


class MeshViews(Reward):
    """An image reward on meshes: `views` rendered views of each mesh, each scored, pooled by `pool`.

    Args:
        reward: the image reward that scores each view.
        views: azimuths per mesh, evenly spaced from 35° (≥ 1).
        size: side of each rendered view in pixels.
        elevation: camera elevation above the horizon in degrees.
        pool: `mean` or `min` of the view scores.
    """

    file_suffixes, file_kind = MESH_SUFFIXES, "mesh"  # what `mmalign score` collects from folders

    def __init__(self, reward: Reward, views: int = 4, size: int = 224, elevation: float = 25.0, pool: str = "mean"):
        if int(views) < 1 or int(size) < 8:
            raise RewardInputError(f"views={views}, size={size}: need at least 1 view of at least 8 px")
        self.reward = image_reward(reward, "mesh-views:")
        self.views, self.size, self.elevation, self.pool = int(views), int(size), float(elevation), check_pool(pool)
        self.name = f"mesh-views:{reward.name}"
        self.needs_prompts = reward.needs_prompts

    @property
    def azimuths(self) -> list[float]:
        """Azimuths in degrees of the rendered views."""
        return [35.0 + 360.0 * k / self.views for k in range(self.views)]

    def render(self, meshes: Any) -> torch.Tensor:
        """Meshes (paths, trimesh objects or folders) → views `(M, views, 3, size, size)` in [0, 1]."""
        out = []
        for i, item in enumerate(as_mesh_list(meshes)):
            is_file = isinstance(item, (str, Path))
            mesh = load_mesh(item if is_file else item.copy(), name=None if is_file else f"mesh {i}")
            views = [render_mesh(mesh, self.size, a, self.elevation) for a in self.azimuths]
            out.append(torch.from_numpy(np.stack(views)).permute(0, 3, 1, 2).float())
        if not out:
            raise RewardInputError("no meshes to score")
        return torch.stack(out)

    def __call__(
        self, samples: Any, prompts: str | Sequence[str] | None = None, progress: bool | None = None
    ) -> torch.Tensor:
        """Score meshes (one or a list of paths / trimesh objects, or folders of mesh files) → `(M,)`."""
        views = self.render(samples)
        prompt_list = broadcast_prompts(prompts, len(views), self.needs_prompts)
        view_prompts = None if prompt_list is None else [p for p in prompt_list for _ in range(self.views)]
        scores = self.reward(views.flatten(0, 1), view_prompts, progress)
        return pool_scores(scores, [self.views] * len(views), self.pool)

    def score_batch(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        """Not used: meshes arrive through `__call__`; `images (N, 3, H, W)` are scored by the inner reward."""
        return self.reward.score_batch(images, prompts)
