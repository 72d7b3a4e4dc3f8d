"""GAN-RM (Liu et al. 2025, "Fake it till You Make it"): a reward learned by telling a few hundred
target images (Preference Proxy Data, PPD) from the generator's own outputs.

`R(x) = σ(h(E(x)))`: `E` is a frozen CLIP image tower (transformers or open_clip folder; the
embedded toy CLIP by default) giving unit-norm embeddings, `h` a small MLP head, the only part
trained. Training is binary cross-entropy with soft targets and class-balanced weights on cached
embeddings; a held-out slice of both classes gives the AUC. Rank-based bootstrapping scores a
further pool of generated images and adds the top M as soft positives `y = exp(−α·rank)` and the
bottom M as negatives, then retrains.

A trained model is a folder (`mmalign_reward.json` + `head.safetensors`) that
`mmalign.load_reward(folder)` or `load_reward("gan-rm", path=folder)` scores images with; video
clips `(N, F, 3, H, W)` are scored by averaging the head's logits over frames (`score_video`).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mmalign.config import option
from mmalign.errors import UserInputError
from mmalign.io import atomic_directory
from mmalign.losses import class_balance_weights, weighted_soft_bce
from mmalign.rewards import REWARD_MANIFEST
from mmalign.rewards.base import Reward, as_image_batch, stack_images
from mmalign.rewards.clip_score import DEFAULT_CLIP, ClipScore
from mmalign.rewards.metrics import roc_auc


@dataclass
class GanRMConfig:
    """How the GAN-RM head is trained (the paper's values are unknown; these fit the toy world)."""

    encoder: str = option("frozen CLIP folder or id giving the image embeddings", DEFAULT_CLIP)
    backend: str = option("auto, transformers or open_clip", "auto")
    hidden: int = option("width of the MLP head", 512)
    dropout: float = option("dropout inside the head", 0.1)
    learning_rate: float = option("AdamW learning rate of the head", 1e-3)
    weight_decay: float = option("AdamW weight decay", 1e-4)
    batch_size: int = option("embeddings per head update", 64)
    epochs: int = option("passes over the training rows", 100)
    holdout_fraction: float = option("share of each class kept out of training to measure AUC", 0.1)
    bootstrap_top: int = option("M: top and bottom generated samples added by rank bootstrapping (0 = off)", 0)
    bootstrap_alpha: float = option("α of the soft labels exp(−α·rank) of bootstrapped positives", 0.01)
    seed: int = option("seed of the split, the head's init and the batch order", 0)


class RewardHead(nn.Module):
    """`(N, D)` embeddings → `(N,)` logits: Linear–GELU–Dropout–Linear."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, 1))

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.net(embeddings).squeeze(-1)


def bootstrap_targets(scores: torch.Tensor, top: int, alpha: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank bootstrapping of a scored pool `scores (P,)`.

    Returns `(top_index (M,), top_labels (M,), bottom_index (M,))`: the M best samples, best
    first, with soft labels `exp(−α·r)` for rank r = 0…M−1, and the M worst (label 0). M is
    capped at P // 2 so the two sets never overlap.
    """
    m = min(top, scores.numel() // 2)
    order = torch.argsort(scores, descending=True, stable=True)
    labels = torch.exp(-alpha * torch.arange(m, dtype=torch.float32))
    return order[:m], labels, order[scores.numel() - m :]


class GanRM(Reward):
    """A trained GAN-RM: `path` is the folder written by `GanRM.save` (or by `train_gan_rm`)."""

    name = "gan-rm"
    needs_prompts = False

    def __init__(self, path: str, device: str | torch.device = "cpu", batch_size: int = 64):
        folder = Path(path)
        manifest_path = folder / REWARD_MANIFEST
        if not manifest_path.is_file():
            raise UserInputError(f"{folder} is not a GAN-RM folder: {REWARD_MANIFEST} is missing")
        manifest = json.loads(manifest_path.read_text())
        self.config = GanRMConfig(**manifest["config"])
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.encoder = ClipScore(self.config.encoder, backend=self.config.backend, device=self.device)
        self.head = RewardHead(manifest["embedding_dim"], self.config.hidden, self.config.dropout)
        self.head.load_state_dict(load_file(folder / "head.safetensors"))
        self.head.to(self.device).eval().requires_grad_(False)
        self.metrics = manifest.get("metrics", {})

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """`(N, 3, H, W)` in [0, 1] → unit-norm CLIP image embeddings `(N, D)` (no graph)."""
        with torch.no_grad():
            return self.encoder.image_embeddings(images)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.head(self.embed(images))

    def score_batch(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        return torch.sigmoid(self.logits(images)).cpu()

    def score_video(self, clips: torch.Tensor) -> torch.Tensor:
        """`clips (N, F, 3, H, W)` in [0, 1] → `(N,)`: σ of the head's logits averaged over frames."""
        if clips.ndim != 5:
            raise ValueError(f"expected clips of shape (N, F, 3, H, W), got {tuple(clips.shape)}")
        n, f = clips.shape[:2]
        logits = torch.cat([self.logits(chunk) for chunk in clips.flatten(0, 1).split(self.batch_size)])
        return torch.sigmoid(logits.view(n, f).mean(1)).cpu()


def save_gan_rm(directory: Path, head: RewardHead, config: GanRMConfig, dim: int, metrics: dict) -> Path:
    """Write a loadable GAN-RM folder atomically: manifest, head weights (safetensors), metrics."""
    with atomic_directory(directory) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, tmp / "head.safetensors")
        manifest = {"reward": GanRM.name, "embedding_dim": dim, "config": asdict(config), "metrics": metrics}
        (tmp / REWARD_MANIFEST).write_text(json.dumps(manifest, indent=2))
    return directory


def _split(n: int, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(n)
    held = int(round(n * fraction)) if n >= 10 else 0
    return order[held:], order[:held]


def _fit_head(
    head: RewardHead,
    embeddings: torch.Tensor,
    targets: torch.Tensor,
    from_target_set: torch.Tensor,
    config: GanRMConfig,
    generator: torch.Generator,
) -> float:
    """Train `head` on `(N, D)` embeddings and soft `(N,)` targets, the PPD rows (`from_target_set`,
    bool) and the generated rows weighing the same in total; returns the last epoch's loss."""
    weights = class_balance_weights((~from_target_set).long())
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    head.train()
    last = float("nan")
    for _ in range(config.epochs):
        order = torch.randperm(len(targets), generator=generator)
        total, count = 0.0, 0
        for batch in order.split(config.batch_size):
            loss = weighted_soft_bce(head(embeddings[batch]), targets[batch], weights[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total, count = total + float(loss.detach()) * len(batch), count + len(batch)
        last = total / count
    head.eval()
    return last


def train_gan_rm(
    target_images: Any,
    generated_images: Any,
    directory: Path,
    config: GanRMConfig | None = None,
    bootstrap_pool: Any = None,
    device: str | torch.device = "cpu",
) -> GanRM:
    """Train a GAN-RM on PPD `target_images` (label 1) vs `generated_images` (label 0) and save it.

    Images are anything `Reward` accepts (tensors in [0, 1], PIL images, paths). With
    `config.bootstrap_top > 0` and a `bootstrap_pool` of further generated images, the first model
    scores the pool, its top/bottom M join the training rows (soft labels), and the head is
    retrained from scratch. Returns the loaded model; `directory/mmalign_reward.json` holds the
    metrics (held-out AUC, class sizes, bootstrap sizes).
    """
    config = config or GanRMConfig()
    targets, generated = as_image_batch(target_images), as_image_batch(generated_images)
    if len(targets) < 2 or len(generated) < 2:
        raise UserInputError(
            f"GAN-RM needs at least 2 target and 2 generated images, got {len(targets)} and {len(generated)}"
        )
    encoder = ClipScore(config.encoder, backend=config.backend, device=device)
    embed = _embedder(encoder)
    emb_pos, emb_neg = embed(targets), embed(generated)
    rng = np.random.default_rng(config.seed)
    (pos_train, pos_held), (neg_train, neg_held) = (
        _split(len(emb_pos), config.holdout_fraction, rng),
        _split(len(emb_neg), config.holdout_fraction, rng),
    )
    rows = torch.cat([emb_pos[pos_train], emb_neg[neg_train]])
    labels = torch.cat([torch.ones(len(pos_train)), torch.zeros(len(neg_train))])
    generator = torch.Generator().manual_seed(config.seed)
    torch.manual_seed(config.seed)
    head = RewardHead(rows.shape[1], config.hidden, config.dropout).to(device)
    is_target = labels.bool()
    loss = _fit_head(head, rows.to(device), labels.to(device), is_target.to(device), config, generator)
    metrics: dict[str, Any] = {"targets": len(targets), "generated": len(generated), "train_loss": loss}
    if config.bootstrap_top > 0 and bootstrap_pool is not None:
        emb_pool = embed(as_image_batch(bootstrap_pool))
        with torch.no_grad():
            pool_scores = head(emb_pool.to(device)).cpu()
        top, top_labels, bottom = bootstrap_targets(pool_scores, config.bootstrap_top, config.bootstrap_alpha)
        rows = torch.cat([rows, emb_pool[top], emb_pool[bottom]])
        labels = torch.cat([labels, top_labels, torch.zeros(len(bottom))])
        is_target = torch.cat([is_target, torch.zeros(len(top) + len(bottom), dtype=torch.bool)])
        head = RewardHead(rows.shape[1], config.hidden, config.dropout).to(device)
        metrics["train_loss"] = _fit_head(
            head, rows.to(device), labels.to(device), is_target.to(device), config, generator
        )
        metrics["bootstrap"] = {"pool": len(emb_pool), "top": len(top), "bottom": len(bottom)}
    with torch.no_grad():
        held_pos, held_neg = head(emb_pos[pos_held].to(device)).cpu(), head(emb_neg[neg_held].to(device)).cpu()
        train_pos, train_neg = head(emb_pos[pos_train].to(device)).cpu(), head(emb_neg[neg_train].to(device)).cpu()
    metrics.update(
        heldout_auc=roc_auc(held_pos, held_neg),
        train_auc=roc_auc(train_pos, train_neg),
        heldout=[len(pos_held), len(neg_held)],
    )
    save_gan_rm(Path(directory), head.cpu(), config, rows.shape[1], metrics)
    return GanRM(str(directory), device=device)


def _embedder(encoder: ClipScore, batch_size: int = 64):
    """Images (anything `Reward` accepts, already batched) → `(N, D)` embeddings on CPU."""

    def embed(images) -> torch.Tensor:
        out = []
        for start in range(0, len(images), batch_size):
            chunk = images[start : start + batch_size]
            batch = chunk if isinstance(chunk, torch.Tensor) else stack_images(chunk)
            with torch.no_grad():
                out.append(encoder.image_embeddings(batch).cpu())
        return torch.cat(out)

    return embed
