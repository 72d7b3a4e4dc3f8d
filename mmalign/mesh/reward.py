"""A trained mesh reward (RewardCS or its Bradley–Terry baseline) as a `Reward`: meshes and prompts in, scores out.

A trained reward is a folder: `mmalign_reward.json` (the registered reward name, the encoder
options, the text embedding size, training metrics) and `model.safetensors` (the network's
weights). `mmalign.load_reward("reward-cs", path=folder)` or `mmalign.load_reward(folder)`
returns a `MeshReward`; calling it with mesh file paths or trimesh objects (one or a list) and a
prompt (or one per mesh) returns `(K,)` scores. A mesh is turned into the encoder's input exactly
as in training (`mesh_points`: unit box, canonical order, the same seeded samples), so a score
does not depend on the order of the file's vertices and faces. RewardCS scores estimate `score / 5`
(0 = worst, 1 = best); Bradley–Terry scores are logits on no fixed scale. Higher is better.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import trimesh
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from mmalign.errors import UserInputError
from mmalign.io import atomic_directory, expand_files
from mmalign.mesh.encoder import MeshEncoderConfig, MeshRewardNet, TextTower
from mmalign.mesh.io import SUFFIXES
from mmalign.mesh.points import mesh_points
from mmalign.registry import resolve_model_path
from mmalign.rewards import REWARD_MANIFEST
from mmalign.rewards.base import Reward, broadcast_prompts

WEIGHTS = "model.safetensors"


def save_mesh_reward(
    directory: Path, net: MeshRewardNet, reward: str, text_dim: int | None, metrics: dict[str, Any]
) -> Path:
    """Write a loadable reward folder atomically: manifest (`reward` names the registry entry) + weights."""
    with atomic_directory(directory) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}, tmp / WEIGHTS)
        manifest = {"reward": reward, "encoder": asdict(net.config), "text_dim": text_dim, "metrics": metrics}
        (tmp / REWARD_MANIFEST).write_text(json.dumps(manifest, indent=2))
    return directory


def as_mesh_list(samples: Any) -> list[Any]:
    """One mesh (a path or a trimesh object), a folder of mesh files, or a sequence of these → a list.

    Folders are searched recursively for mesh files (sorted by path).
    """
    if isinstance(samples, (str, Path, trimesh.Trimesh, trimesh.Scene)):
        samples = [samples]
    meshes: list[Any] = []
    for item in samples:
        if isinstance(item, (str, Path)) and Path(item).is_dir():
            meshes.extend(expand_files([item], SUFFIXES, "mesh"))
        else:
            meshes.append(item)
    return meshes


class MeshReward(Reward):
    """A trained mesh reward loaded from `path` (a folder written by `save_mesh_reward`).

    Without a path, RewardCS is the one shipped with mmalign (`embedded:mesh-reward-cs`, trained on
    the embedded mesh world by `scripts/train_mesh_reward.py`).
    """

    name = "reward-cs"
    default_path: str | None = "embedded:mesh-reward-cs"
    file_suffixes, file_kind = SUFFIXES, "mesh"  # what `mmalign score` collects from folders

    def __init__(self, path: str | None = None, device: str | torch.device = "cpu", batch_size: int = 64):
        path = path or self.default_path
        if path is None:
            raise UserInputError(
                f"the {self.name} mesh reward scores with a trained model: pass path=<folder> (a run's final/reward, "
                f"written by `mmalign train configs/mesh/{self.name.replace('-', '_')}.yaml`); on the command line "
                "--reward-arg path=FOLDER"
            )
        folder = Path(resolve_model_path(path))
        manifest_path = folder / REWARD_MANIFEST
        if not manifest_path.is_file() or not (folder / WEIGHTS).is_file():
            raise UserInputError(f"{folder} is not a trained mesh reward folder ({REWARD_MANIFEST} + {WEIGHTS})")
        manifest = json.loads(manifest_path.read_text())
        self.name = manifest["reward"]
        self.config = MeshEncoderConfig(**manifest["encoder"])
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.needs_prompts = self.config.text_conditioning
        self.text = TextTower(self.config.text_encoder, self.device) if self.config.text_conditioning else None
        if self.text is not None and self.text.dim != manifest["text_dim"]:
            raise UserInputError(
                f"{folder}: trained with {manifest['text_dim']}-d text embeddings, but {self.config.text_encoder} "
                f"gives {self.text.dim}-d ones"
            )
        self.net = MeshRewardNet(self.config, manifest["text_dim"])
        self.net.load_state_dict(load_file(folder / WEIGHTS))
        self.net.to(self.device).eval().requires_grad_(False)
        self.metrics = manifest.get("metrics", {})

    def points(self, meshes: Any) -> torch.Tensor:
        """Meshes (paths or trimesh objects) → `(K, N, config.channels)` encoder input, sampled as in training."""
        c = self.config
        out = [
            mesh_points(m, c.points, c.sample_seed, None if isinstance(m, (str, Path)) else f"mesh {i}", c.part_contact)
            for i, m in enumerate(as_mesh_list(meshes))
        ]
        if not out:
            raise UserInputError("no meshes to score")
        return torch.stack(out)

    def rewards(self, points: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        """`(B, N, C ≥ config.channels)` → `(B,)` rewards with gradients to `points` (for reward-guided optimisation).

        Channels past the reward's own (a part label it does not read) are ignored, so an ensemble
        can share one sample tensor.
        """
        text = self.text(prompts).to(self.device) if self.text is not None else None
        return self.net(points[..., : self.config.channels].to(self.device), text)[1]

    def score_batch(self, points: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        """`points (B, N, C)` → `(B,)` scores on CPU (the `Reward` hook; meshes arrive through `__call__`)."""
        with torch.no_grad():
            return self.rewards(points, prompts).cpu()

    def __call__(
        self, samples: Any, prompts: str | Sequence[str] | None = None, progress: bool | None = None
    ) -> torch.Tensor:
        """Score meshes (paths or trimesh objects, one or many) against `prompts` (one, or one per mesh)."""
        points = self.points(samples)
        prompt_list = broadcast_prompts(prompts, len(points), self.needs_prompts)
        show = len(points) > self.progress_threshold if progress is None else progress
        scores = []
        for start in tqdm(range(0, len(points), self.batch_size), desc=f"scoring ({self.name})", disable=not show):
            chunk_prompts = None if prompt_list is None else prompt_list[start : start + self.batch_size]
            scores.append(self.score_batch(points[start : start + self.batch_size], chunk_prompts))
        return torch.cat(scores)


class BradleyTerryMeshReward(MeshReward):
    """The paired Bradley–Terry mesh reward: nothing is shipped, so `path` is required."""

    name = "reward-bt"
    default_path = None
