"""What RewardCS and its Bradley–Terry baseline share on the shared trainer: data, network, evaluation, saving.

`MeshRewardMethod` loads the mesh set of `data.path` (train and held-out splits, surface samples
cached), embeds every prompt once with the frozen text tower, and trains a `MeshRewardNet`. A
training item is `{"preferred": i, "dispreferred": j}` (indices into the training set); a
subclass chooses the items (`train_dataset`) and the loss on the batch's embeddings and rewards
(`objective`). Evaluation on the held-out split (prompts training never saw) reports:

- `heldout_pairwise_accuracy` (the gold metric): how often the preferred mesh of a same-prompt
  (preferred, dispreferred) pair gets the higher reward, over every such pair (ties count ½);
- `heldout_auroc`: the same over every preferred × dispreferred combination, any prompts;
- `heldout_cs`: the CS divergence between the preferred and dispreferred embeddings;
- `heldout_mse`: mean `(r − score/5)²` (methods that regress the score);
- `heldout_auroc/<kind>`: preferred vs the dispreferred rows of each `kind`, when rows carry one.

The result is a reward folder (`final/reward`, see `mmalign.mesh.reward`).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from mmalign.config import check_range, option
from mmalign.losses import cs_divergence
from mmalign.mesh.data import MeshDataConfig, MeshSet, MeshSetConfig, load_mesh_sets, same_prompt_pairs
from mmalign.mesh.encoder import MeshEncoderConfig, MeshRewardNet, TextTower, knn_indices
from mmalign.mesh.reward import save_mesh_reward
from mmalign.rewards.metrics import pairwise_accuracy, roc_auc
from mmalign.train.method import Evaluation, Method

GOLD = "heldout_pairwise_accuracy"


@dataclass
class MeshRewardConfig:
    """Options every mesh reward method shares (data thresholds, encoder)."""

    meshes: MeshSetConfig = option("thresholds, held-out split, embedded set", default_factory=MeshSetConfig)
    encoder: MeshEncoderConfig = option(
        "point encoder, text conditioning, reward head", default_factory=MeshEncoderConfig
    )
    eval_batch_size: int = option("meshes encoded at once in evaluation", 256)
    train_draws: int = option(
        "independent surface draws cached per training mesh; each training row reads a random one (an "
        "augmentation: the reward learns the surface, not one set of samples). Held-out rows and scoring "
        "read the `encoder.sample_seed` draw",
        1,
    )

    def check_values(self, prefix: str) -> None:
        """Ranges, checked when the config is built (keys named under `prefix`)."""
        check_range(f"{prefix}eval_batch_size", self.eval_batch_size, 1)
        check_range(f"{prefix}train_draws", self.train_draws, 1)


def reward_metrics(
    rewards: torch.Tensor, embeddings: torch.Tensor, split: MeshSet, regresses_scores: bool
) -> dict[str, float]:
    """The held-out metrics of the module doc for `rewards (K,)` and `embeddings (K, D)` of `split`."""
    preferred = split.preferred
    pairs = same_prompt_pairs(split.prompts, preferred, every=True)
    win, lose = rewards[preferred], rewards[~preferred]
    metrics = {
        GOLD: pairwise_accuracy(rewards[pairs[:, 0]], rewards[pairs[:, 1]]),
        "heldout_auroc": roc_auc(win, lose),
        "heldout_cs": float(cs_divergence(embeddings[preferred], embeddings[~preferred])),
    }
    if regresses_scores:
        metrics["heldout_mse"] = float((rewards - split.scores / 5).pow(2).mean())
    losing_kinds = [k if not p else None for k, p in zip(split.kinds, preferred.tolist())]
    for kind in dict.fromkeys(k for k in losing_kinds if k is not None):
        losers = rewards[torch.tensor([k == kind for k in losing_kinds])]
        metrics[f"heldout_auroc/{kind}"] = roc_auc(win, losers)
    return metrics


class MeshRewardMethod(Method):
    """Trains a `MeshRewardNet` on a mesh set; subclasses give `train_dataset` and `objective`."""

    data_config_class = MeshDataConfig

    config: MeshRewardConfig
    reward_name: ClassVar[str]
    regresses_scores: ClassVar[bool] = True

    def setup(self, accelerator) -> None:
        self.device = accelerator.device
        e = self.config.encoder
        with accelerator.main_process_first():
            sets = load_mesh_sets(
                self.run.data, self.config.meshes, e.points, e.sample_seed, self.config.train_draws, e.part_contact
            )
        self.train_set, self.heldout_set = sets
        tower = TextTower(e.text_encoder, self.device) if e.text_conditioning else None
        self.text_dim = tower.dim if tower is not None else None
        splits = (("train", self.train_set), ("heldout", self.heldout_set))
        self.text = {name: tower(part.prompts).to(self.device) if tower else None for name, part in splits}
        # `(draws, K, N, C)` per split (held out: one draw); the samples are fixed, so is their kNN
        # graph: computed once, not at every step
        self.points = {name: part.points.reshape(-1, *part.points.shape[-3:]).to(self.device) for name, part in splits}
        self.neighbours = {
            name: knn_indices(points.flatten(0, 1)[..., :3], e.neighbours).view(*points.shape[:3], -1)
            for name, points in self.points.items()
        }
        self.targets = self.train_set.scores.to(self.device) / 5
        self.net = MeshRewardNet(e, self.text_dim).to(self.device)
        self.module: torch.nn.Module = self.net

    # ------------------------------------------------------------------ Method plumbing
    def trainable_module(self) -> torch.nn.Module:
        return self.net

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.net.load_state_dict(state)

    def gold_metric(self) -> str:
        return GOLD

    def report_description(self) -> str:
        return (
            f"Mesh set `{self.run.data.path}`: {len(self.train_set)} training meshes; evaluated on the "
            f"{len(self.heldout_set)} held-out meshes, whose prompts training never saw."
        )

    # ------------------------------------------------------------------ training
    def encode(
        self, split: str, index: torch.Tensor, module: torch.nn.Module, draw: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings `(B, D)` and rewards `(B,)` of rows `index (B,)` of a split ("train" or "heldout").

        `draw (B,)`: which cached surface draw each row reads (default: the first).
        """
        draw = torch.zeros_like(index) if draw is None else draw
        text = self.text[split]
        points, neighbours = self.points[split][draw, index], self.neighbours[split][draw, index]
        return module(points, None if text is None else text[index], neighbours)

    @abstractmethod
    def objective(
        self, embeddings: torch.Tensor, rewards: torch.Tensor, targets: torch.Tensor, n: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss and metrics of a batch: rows `[:n]` preferred, `[n:]` dispreferred; `targets` = score / 5."""

    def compute_loss(self, batch: dict[str, torch.Tensor], step: int, micro: int):
        n = len(batch["preferred"])
        index = torch.cat([batch["preferred"], batch["dispreferred"]]).to(self.device)
        generator = torch.Generator().manual_seed(1_000_003 * self.run.seed + 1_009 * step + micro)
        draw = torch.randint(self.config.train_draws, index.shape, generator=generator).to(self.device)
        embeddings, rewards = self.encode("train", index, self.module, draw)
        return self.objective(embeddings, rewards, self.targets[index], n)

    # ------------------------------------------------------------------ evaluation and result
    def evaluate(self, step: int) -> Evaluation:
        with torch.no_grad():
            parts = [
                self.encode("heldout", index, self.net)
                for index in torch.arange(len(self.heldout_set), device=self.device).split(self.config.eval_batch_size)
            ]
        embeddings, rewards = (torch.cat(t).cpu() for t in zip(*parts))
        return Evaluation(reward_metrics(rewards, embeddings, self.heldout_set, self.regresses_scores))

    def save_final(self, directory: Path) -> list[str]:
        metrics = {"train_rows": len(self.train_set), "heldout_rows": len(self.heldout_set)}
        metrics.update(self.evaluate(-1).metrics)
        save_mesh_reward(directory / "reward", self.net, self.reward_name, self.text_dim, metrics)
        return ["reward"]
