"""The paired Bradley–Terry baseline of RewardCS (`method: reward-bt`): same meshes, same network, pairs.

The meshes of the unpaired set are arranged in (preferred, dispreferred) pairs that share a prompt
(`mmalign.mesh.data.same_prompt_pairs`) and the network is trained with `−log σ(r_w − r_l)`
(`mmalign.losses.bradley_terry_loss`), so the paper's claim that unpaired CS supervision does as
well as paired supervision can be checked on the same data. Its rewards are logits (no score scale),
so no MSE is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmalign.config import check_choice, option
from mmalign.losses import bradley_terry_loss
from mmalign.mesh.data import PairDraws, same_prompt_pairs
from mmalign.mesh.reward_training import MeshRewardConfig, MeshRewardMethod

PAIRINGS = ("cycle", "every")


@dataclass
class RewardBTConfig(MeshRewardConfig):
    pairing: str = option(
        "cycle: each prompt's preferred and dispreferred meshes shuffled and zipped, the shorter list repeated (every "
        "mesh in a pair, as many pairs as the larger class); every: all same-prompt combinations",
        "cycle",
    )

    def check_values(self, prefix: str) -> None:
        super().check_values(prefix)
        check_choice(f"{prefix}pairing", self.pairing, PAIRINGS)


class RewardBT(MeshRewardMethod):
    config_class = RewardBTConfig
    config: RewardBTConfig
    reward_name = "reward-bt"
    regresses_scores = False

    def train_dataset(self) -> PairDraws:
        pairs = same_prompt_pairs(
            self.train_set.prompts, self.train_set.preferred, every=self.config.pairing == "every", seed=self.run.seed
        )
        return PairDraws(pairs)

    def objective(self, embeddings: torch.Tensor, rewards: torch.Tensor, targets: torch.Tensor, n: int):
        margin = (rewards[:n] - rewards[n:]).detach()
        return bradley_terry_loss(rewards[:n], rewards[n:]), {"accuracy": (margin > 0).float().mean()}
