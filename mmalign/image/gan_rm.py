"""GAN-RM (Liu et al. 2025, "Fake it till You Make it"): a reward learned by telling a few hundred
target images (Preference Proxy Data, PPD) from the generator's own outputs.

`R(x) = σ(h(E(x)))`: `E` is a frozen CLIP image tower (transformers or open_clip folder; the
embedded toy CLIP by default) giving unit-norm embeddings, `h` a small MLP head, the only part
trained. Training (`method: gan-rm-reward`, on the Trainer) is binary cross-entropy with soft
targets and class-balanced weights on cached embeddings; a held-out slice of both classes gives the
AUC. Rank-based bootstrapping lets a first model score a further pool of generated images and
trains a second one with the top M added as soft positives `y = exp(−α·rank)` and the bottom M as
negatives. `train_gan_rm` runs both from Python on folders of images.

A trained model is a folder (`mmalign_reward.json` + `head.safetensors`) that
`mmalign.load_reward(folder)` or `load_reward("gan-rm", path=folder)` scores images with; video
clips `(N, F, 3, H, W)` are scored by averaging the head's logits over frames (`score_video`).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from mmalign.config import (
    ConfigError,
    DataSource,
    EvalSchedule,
    RunConfig,
    TrainConfig,
    check_choice,
    check_range,
    option,
)
from mmalign.errors import UserInputError
from mmalign.io import atomic_directory
from mmalign.losses import class_balance_weights, weighted_soft_bce
from mmalign.rewards import REWARD_MANIFEST
from mmalign.rewards.base import Reward, as_image_batch, stack_images
from mmalign.rewards.clip_score import DEFAULT_CLIP, ClipScore
from mmalign.rewards.metrics import roc_auc
from mmalign.train.method import Evaluation, Method

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass
class GanRMHead:
    """The reward network: the frozen encoder, the head, the held-out split and rank bootstrapping."""

    encoder: str = option("frozen CLIP folder or id giving the image embeddings", DEFAULT_CLIP)
    backend: str = option("auto, transformers or open_clip", "auto")
    hidden: int = option("width of the MLP head", 512)
    dropout: float = option("dropout inside the head", 0.1)
    holdout_fraction: float = option("share of each class kept out of training to measure AUC", 0.1)
    bootstrap_top: int = option("M: top and bottom generated samples added by rank bootstrapping (0 = off)", 0)
    bootstrap_alpha: float = option("α of the soft labels exp(−α·rank) of bootstrapped positives", 0.01)

    def check_values(self, prefix: str) -> None:
        """Ranges and choices, checked when the config is built (keys named under `prefix`)."""
        check_choice(f"{prefix}backend", self.backend, ("auto", "transformers", "open_clip"))
        check_range(f"{prefix}hidden", self.hidden, 1)
        check_range(f"{prefix}dropout", self.dropout, 0, 1)
        check_range(f"{prefix}holdout_fraction", self.holdout_fraction, 0, 1, open_low=True)
        check_range(f"{prefix}bootstrap_top", self.bootstrap_top, 0)
        check_range(f"{prefix}bootstrap_alpha", self.bootstrap_alpha, 0)


@dataclass
class GanRMConfig(GanRMHead):
    """How a GAN-RM is trained by `train_gan_rm` and the GAN-RM rounds (the paper's values are unknown;
    these fit the toy world): the network plus its optimisation."""

    learning_rate: float = option("AdamW learning rate of the head", 1e-3)
    weight_decay: float = option("AdamW weight decay", 1e-4)
    batch_size: int = option("embeddings per head update", 64)
    epochs: int = option("passes over the training rows", 100)
    seed: int = option("seed of the split, the head's init and the batch order", 0)


@dataclass
class GanRMRewardConfig(GanRMHead):
    """Options of `gan-rm-reward` (section `gan_rm_reward`); the optimisation is the `train` section's."""

    bootstrap_from: str | None = option(
        "a trained GAN-RM folder whose scores rank data.pool for bootstrapping (needs bootstrap_top > 0)", None
    )


@dataclass
class GanRMImagesConfig(DataSource):
    """The `data` section of `gan-rm-reward`: folders of images."""

    path: str = option("folder of target images, the Preference Proxy Data (label 1)", default="")
    generated: str = option("folder of the generator's images (label 0)", default="")
    pool: str | None = option("folder of further generated images ranked for bootstrapping", default=None)


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
        head = manifest["config"]
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.encoder = ClipScore(head["encoder"], backend=head["backend"], device=self.device)
        self.head = RewardHead(manifest["embedding_dim"], head["hidden"], head["dropout"])
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


def save_gan_rm(directory: Path, head: RewardHead, config: GanRMHead, dim: int, metrics: dict) -> Path:
    """Write a loadable GAN-RM folder atomically: manifest, head weights (safetensors), metrics."""
    with atomic_directory(directory) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}, tmp / "head.safetensors")
        manifest = {"reward": GanRM.name, "embedding_dim": dim, "config": asdict(config), "metrics": metrics}
        (tmp / REWARD_MANIFEST).write_text(json.dumps(manifest, indent=2))
    return directory


def save_image_folder(images: torch.Tensor, directory: Path, prompts: list[str] | None = None) -> None:
    """`images (N, 3, H, W)` in [0, 1] → an atomically written folder of PNGs (+ prompts.txt)."""
    with atomic_directory(directory) as tmp:
        for i, image in enumerate(images):
            array = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            Image.fromarray(array).save(tmp / f"{i:05d}.png")
        if prompts is not None:
            (tmp / "prompts.txt").write_text("\n".join(prompts) + "\n")


def image_files(folder: str | Path, key: str) -> list[Path]:
    """The images under `folder` (recursively, sorted); errors name the config `key`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserInputError(f"{key}: {folder} is not a folder of images")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserInputError(f"{key}: {folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def held_out(n: int, fraction: float) -> int:
    """How many of `n` images of a class are kept out of training to measure the AUC (none below 10)."""
    return int(round(n * fraction)) if n >= 10 else 0


def _split(n: int, fraction: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(n)
    held = held_out(n, fraction)
    return order[held:], order[:held]


def head_of(config: GanRMHead) -> GanRMHead:
    """The network part of a config (a `GanRMConfig` or `GanRMRewardConfig`)."""
    return GanRMHead(**{f.name: getattr(config, f.name) for f in fields(GanRMHead)})


class GanRMReward(Method):
    """Trains a GAN-RM head on frozen CLIP embeddings of `data.path` (targets, label 1) against
    `data.generated` (label 0), on the Trainer: batches of cached embeddings with soft targets and
    class-balanced weights (`weighted_soft_bce`); evaluation is the held-out AUC. With
    `bootstrap_top` and `bootstrap_from`, the given GAN-RM ranks `data.pool` and its top/bottom M
    join the training rows (soft positives, negatives)."""

    config_class = GanRMRewardConfig
    data_config_class = GanRMImagesConfig
    config: GanRMRewardConfig

    def setup(self, accelerator) -> None:
        c, d = self.config, self.run.data
        self.device = accelerator.device
        if c.bootstrap_top > 0 and (d.pool is None or c.bootstrap_from is None):
            raise ConfigError("gan_rm_reward.bootstrap_top needs data.pool and gan_rm_reward.bootstrap_from")
        if c.bootstrap_top == 0 and (d.pool is not None or c.bootstrap_from is not None):
            raise ConfigError("data.pool and gan_rm_reward.bootstrap_from need gan_rm_reward.bootstrap_top > 0")
        targets, generated = image_files(d.path, "data.path"), image_files(d.generated, "data.generated")
        if len(targets) < 2 or len(generated) < 2:
            raise UserInputError(
                f"GAN-RM needs at least 2 target and 2 generated images, got {len(targets)} and {len(generated)}"
            )
        embed = _embedder(ClipScore(c.encoder, backend=c.backend, device=self.device))
        emb_pos, emb_neg = embed(as_image_batch(targets)), embed(as_image_batch(generated))
        rng = np.random.default_rng(self.run.seed)
        (pos_train, pos_held), (neg_train, neg_held) = (
            _split(len(emb_pos), c.holdout_fraction, rng),
            _split(len(emb_neg), c.holdout_fraction, rng),
        )
        rows = torch.cat([emb_pos[pos_train], emb_neg[neg_train]])
        labels = torch.cat([torch.ones(len(pos_train)), torch.zeros(len(neg_train))])
        is_target = labels.bool()
        self.facts: dict[str, Any] = {"targets": len(targets), "generated": len(generated),
                                      "heldout": [len(pos_held), len(neg_held)]}  # fmt: skip
        if c.bootstrap_top > 0:
            emb_pool = embed(as_image_batch(image_files(d.pool, "data.pool")))
            first = GanRM(c.bootstrap_from, device=self.device)
            with torch.no_grad():
                pool_scores = first.head(emb_pool.to(self.device)).cpu()
            top, top_labels, bottom = bootstrap_targets(pool_scores, c.bootstrap_top, c.bootstrap_alpha)
            rows = torch.cat([rows, emb_pool[top], emb_pool[bottom]])
            labels = torch.cat([labels, top_labels, torch.zeros(len(bottom))])
            is_target = torch.cat([is_target, torch.zeros(len(top) + len(bottom), dtype=torch.bool)])
            self.facts["bootstrap"] = {"pool": len(emb_pool), "top": len(top), "bottom": len(bottom)}
        weights = class_balance_weights((~is_target).long())
        self.rows = [{"embedding": e, "target": t, "weight": w} for e, t, w in zip(rows, labels, weights)]
        self.splits = {
            "heldout": (emb_pos[pos_held], emb_neg[neg_held]),
            "train": (emb_pos[pos_train], emb_neg[neg_train]),
        }
        self.head = RewardHead(rows.shape[1], c.hidden, c.dropout).to(self.device)
        self.module = self.head

    def trainable_module(self) -> torch.nn.Module:
        return self.head

    def train_dataset(self) -> list[dict[str, torch.Tensor]]:
        return self.rows

    def compute_loss(self, batch: dict[str, torch.Tensor], step: int, micro: int):
        self.module.train()
        logits = self.module(batch["embedding"])
        return weighted_soft_bce(logits, batch["target"], batch["weight"]), {}

    @torch.no_grad()
    def evaluate(self, step: int) -> Evaluation:
        self.head.eval()
        metrics = {}
        for name, (pos, neg) in self.splits.items():
            if len(pos) and len(neg):
                scores = [self.head(side.to(self.device)).cpu() for side in (pos, neg)]
                metrics[f"{name}_auc"] = roc_auc(*scores)
        return Evaluation(metrics)

    def gold_metric(self) -> str:
        return "heldout_auc"

    def report_description(self) -> str:
        d = self.run.data
        return (f"GAN-RM head on `{self.config.encoder}` embeddings: {self.facts['targets']} target images from "
                f"`{d.path}` against {self.facts['generated']} generated ones from `{d.generated}`; AUC on "
                f"{self.facts['heldout']} held-out targets / generated images.")  # fmt: skip

    def save_final(self, directory: Path) -> list[str]:
        metrics = {**self.facts, **self.evaluate(-1).metrics}
        dim = self.rows[0]["embedding"].shape[0]
        save_gan_rm(directory / "reward", self.head, head_of(self.config), dim, metrics)
        return ["reward"]


def reward_run(
    targets: str | Path,
    generated: str | Path,
    run_dir: str | Path,
    config: GanRMConfig,
    *,
    rows: int,
    pool: str | Path | None = None,
    bootstrap_from: str | Path | None = None,
    recipe: str = "gan-rm-reward",
) -> RunConfig:
    """The `gan-rm-reward` run that trains `config`'s GAN-RM on about `rows` training rows: its
    optimisation as a `train` section (`epochs` passes of constant-rate AdamW steps over full batches
    of at most `batch_size` rows, no clipping, one checkpoint at the end)."""
    batch = max(1, min(config.batch_size, rows))
    steps = config.epochs * max(1, rows // batch)
    return RunConfig(
        method="gan-rm-reward", recipe=recipe, seed=config.seed, output_dir=str(run_dir), model=None,
        data=GanRMImagesConfig(path=str(targets), generated=str(generated), pool=None if pool is None else str(pool)),
        train=TrainConfig(max_steps=steps, batch_size=batch, learning_rate=config.learning_rate,
                          lr_scheduler="constant", weight_decay=config.weight_decay, max_grad_norm=None,
                          log_every=max(1, steps // 20), checkpoint_every=steps, keep_checkpoints=1),
        eval=EvalSchedule(every=0),
        method_args=GanRMRewardConfig(**asdict(head_of(config)),
                                      bootstrap_from=None if bootstrap_from is None else str(bootstrap_from)),
    )  # fmt: skip


def reward_runs(
    targets: str | Path,
    generated: str | Path,
    run_dir: str | Path,
    config: GanRMConfig,
    pool: str | Path | None = None,
    recipe: str = "gan-rm-reward",
) -> list[RunConfig]:
    """The `gan-rm-reward` runs, in order, that train `config`'s GAN-RM into `run_dir`: one, or with
    bootstrapping (`config.bootstrap_top > 0` and a `pool` folder) a first model in `run_dir/init`
    whose scores rank the pool, then the final one with its top and bottom M added."""
    rows = sum(n - held_out(n, config.holdout_fraction)
               for n in (len(image_files(targets, "targets")), len(image_files(generated, "generated"))))  # fmt: skip
    if config.bootstrap_top <= 0 or pool is None:
        return [reward_run(targets, generated, run_dir, config, rows=rows, recipe=recipe)]
    init_dir = Path(run_dir) / "init"
    init = reward_run(targets, generated, init_dir, dataclasses.replace(config, bootstrap_top=0), rows=rows,
                      recipe=f"{recipe}/init")  # fmt: skip
    rows += 2 * min(config.bootstrap_top, len(image_files(pool, "pool")) // 2)
    final = reward_run(targets, generated, run_dir, config, rows=rows, pool=pool,
                       bootstrap_from=init_dir / "final" / "reward", recipe=recipe)  # fmt: skip
    return [init, final]


def train_gan_rm(
    targets: str | Path,
    generated: str | Path,
    run_dir: str | Path,
    config: GanRMConfig | None = None,
    pool: str | Path | None = None,
) -> GanRM:
    """Train a GAN-RM on the images of folder `targets` (label 1) against folder `generated` (label 0)
    on the Trainer, into run directory `run_dir`; returns the reward at `run_dir/final/reward`.

    With `config.bootstrap_top > 0` and a `pool` folder, a first model (`run_dir/init`) ranks the pool
    and the final one trains with its top and bottom M added. A rerun resumes like any run.
    """
    import mmalign.train as training

    for run in reward_runs(targets, generated, run_dir, config or GanRMConfig(), pool):
        training.run(run)
    return GanRM(str(Path(run_dir) / "final" / "reward"))


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
