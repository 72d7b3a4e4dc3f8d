"""RewardCS (DreamCS, Zou et al. 2025): a mesh reward learned from unpaired scored meshes (`method: reward-cs`).

Each mesh carries an absolute score in [0, 5]; thresholds split the set into preferred and
dispreferred meshes (`mmalign.mesh.data`). Batches are stratified: each holds `train.batch_size`
preferred and as many dispreferred meshes, drawn independently (no pairing, any prompts). With
LayerNorm-ed embeddings `x` (preferred) and `y` (dispreferred) and rewards `r`:

    loss = mean_k (r_k − s_k/5)² + λ · (−D_CS(x, y))

`D_CS` is the kernel Cauchy–Schwarz divergence (`mmalign.losses.cs_divergence`, Gaussian kernel,
median bandwidth by default): the encoder is pushed to separate the two sets' embedding
distributions while the head regresses the score. λ = 0 is plain score regression.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmalign.config import ConfigError, check_range, option
from mmalign.losses import cs_divergence
from mmalign.mesh.data import StratifiedDraws
from mmalign.mesh.reward_training import MeshRewardConfig, MeshRewardMethod


@dataclass
class RewardCSConfig(MeshRewardConfig):
    cs_weight: float = option("λ: weight of −D_CS(preferred, dispreferred embeddings); 0 = score regression only", 1.0)
    bandwidth: float | None = option("σ of the CS kernel on the embeddings; null = the batch's median distance", None)
    min_per_class: int = option(
        "batches are stratified: each holds train.batch_size preferred and as many dispreferred meshes (per "
        "process); fewer than this many per class is an error",
        8,
    )

    def check_values(self, prefix: str) -> None:
        super().check_values(prefix)
        check_range(f"{prefix}cs_weight", self.cs_weight, 0)
        check_range(f"{prefix}bandwidth", self.bandwidth, 0, open_low=True)
        check_range(f"{prefix}min_per_class", self.min_per_class, 2)


class RewardCS(MeshRewardMethod):
    config_class = RewardCSConfig
    config: RewardCSConfig
    reward_name = "reward-cs"

    def setup(self, accelerator) -> None:
        per_process = self.run.train.batch_size // accelerator.num_processes
        if per_process < self.config.min_per_class:
            raise ConfigError(
                f"train.batch_size={self.run.train.batch_size} gives {per_process} meshes of each class per process, "
                f"below reward_cs.min_per_class={self.config.min_per_class}"
            )
        super().setup(accelerator)

    def train_dataset(self) -> StratifiedDraws:
        return StratifiedDraws(self.train_set.preferred, seed=self.run.seed)

    def objective(self, embeddings: torch.Tensor, rewards: torch.Tensor, targets: torch.Tensor, n: int):
        mse = F.mse_loss(rewards, targets)
        cs = cs_divergence(embeddings[:n], embeddings[n:], bandwidth=self.config.bandwidth)
        loss = mse - self.config.cs_weight * cs
        return loss, {"mse": mse.detach(), "cs": cs.detach()}
