"""GAN-RM post-training rounds as one recipe (`method: gan-rm`).

Round k (1…K), each stage kept in `output_dir/round-k/` and recorded when complete
(`mmalign.train.stages`), so a killed run resumes where it stopped (the training stage resumes from
its own checkpoints) and a changed config is refused:

1. `raw/`: the current generator's samples for random prompts, the RM's negatives (round 1's
   are reused later unless `refresh_raw_negatives`); `pool/`: fresh samples for bootstrapping.
2. `rm/`: a GAN-RM trained to tell the target images (PPD) from `raw/` (`mmalign.image.gan_rm`).
3. `pairs/`: `candidates` samples per training prompt, the RM's best vs worst (a pair folder).
4. `train/`: Diffusion-DPO on the pairs (or SFT on the winners) from the current generator; its
   merged pipeline is the next round's generator and reference.

`report.json` at the top holds the held-out gold metric before round 1 and after round K, and
each round's RM AUC, pair count and gold metric.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmalign.best_of_n import sample_candidates
from mmalign.config import ConfigError, DataConfig, EvalConfig, ModelConfig, RunConfig, option
from mmalign.data import shapes_world
from mmalign.data.shapes_prefs import write_self_pairs
from mmalign.data.sources import cache_root
from mmalign.errors import UserInputError
from mmalign.image.diffusion_dpo import DiffusionDPOConfig
from mmalign.image.diffusion_sft import DiffusionSFTConfig
from mmalign.image.gan_rm import GanRM, GanRMConfig, image_files, reward_runs, save_image_folder
from mmalign.io import cache_lock
from mmalign.models.diffusion import DiffusionModel
from mmalign.registry import resolve_model_path
from mmalign.rewards.base import load_image
from mmalign.train.grids import side_by_side
from mmalign.train.stages import StagedRecipe

EMBEDDED_TARGETS = "embedded:shapes-renders"


@dataclass
class GanRMRoundsConfig:
    rounds: int = option("RM → pairs → generator update rounds", 2)
    update: str = option("dpo (best vs worst pairs) or sft (the best of each prompt)", "dpo")
    targets: str = option(
        "Preference Proxy Data: a folder of target images, or embedded:shapes-renders (clean renders)", EMBEDDED_TARGETS
    )
    num_targets: int = option("how many clean renders embedded:shapes-renders draws", 300)
    raw_negatives: int = option("generated images labelled 0 when training the RM", 300)
    refresh_raw_negatives: bool = option("draw the RM's negatives from the current generator every round", False)
    bootstrap_pool: int = option("generated images ranked for bootstrapping (needs reward_model.bootstrap_top)", 0)
    prompts: str = option("training prompts: train (shapes-world train split) or a text file, one per line", "train")
    num_prompts: int = option("prompts per round that get candidates", 256)
    candidates: int = option("samples per prompt; the RM's best and worst form a pair", 4)
    min_margin: float = option("drop pairs whose RM scores differ by less than this", 0.05)
    num_steps: int = option("sampling steps for raw negatives and candidates", 20)
    guidance_scale: float = option("classifier-free guidance for raw negatives and candidates", 3.0)
    reward_model: GanRMConfig = option("how each round's RM is trained", default_factory=GanRMConfig)
    dpo: DiffusionDPOConfig = option("Diffusion-DPO options (update: dpo)", default_factory=DiffusionDPOConfig)


@dataclass
class GanRMDataConfig:
    """The `data` section of `gan-rm`: where the embedded renders are cached and how each round's pairs are
    preprocessed for its DPO/SFT run (the target images are `gan_rm.targets`)."""

    cache_dir: str | None = option(
        "where generated embedded data is cached; null = $MMALIGN_CACHE or ~/.cache/mmalign", default=None
    )
    resolution: int | None = option("training resolution in pixels; null = the model's default", default=None)
    random_crop: bool = option("random instead of centre crop after resizing", default=False)
    random_flip: bool = option("horizontal flip with probability 1/2, per image", default=False)
    max_pairs: int | None = option("train each round on at most this many pairs", default=None)


class GanRMRounds(StagedRecipe):
    """The rounds as stages of one run (`mmalign.train.stages`)."""

    config_class = GanRMRoundsConfig
    model_config_class = ModelConfig
    data_config_class = GanRMDataConfig
    eval_config_class = EvalConfig
    config: GanRMRoundsConfig

    def __init__(self, run: RunConfig):
        super().__init__(run)
        if self.config.rounds < 1:
            raise ConfigError(f"gan_rm.rounds must be at least 1, got {self.config.rounds}")
        if self.config.update not in ("dpo", "sft"):
            raise ConfigError(f"gan_rm.update must be dpo or sft, got {self.config.update!r}")
        if self.config.candidates < 2:
            raise ConfigError(f"gan_rm.candidates must be at least 2 (best vs worst), got {self.config.candidates}")

    # ------------------------------------------------------------------ inputs
    def target_images(self, prompts: list[str]) -> Path:
        """The folder of PPD images; the embedded renders are drawn once into the data cache.

        The embedded renders depict captions drawn from the same `prompts` as the generator's
        samples: with another caption mix (say, more single shapes) the RM would separate the two
        classes by content and reward dropping objects instead of clean, faithful images.
        """
        if self.config.targets != EMBEDDED_TARGETS:
            for f in image_files(self.config.targets, "gan_rm.targets"):
                load_image(f)  # an unreadable image fails now, named, not halfway through a round
            return Path(self.config.targets)
        key = hashlib.sha1("\n".join(prompts).encode()).hexdigest()[:12]
        folder = cache_root(self.run.data) / f"shapes-renders-{self.config.num_targets}-seed{self.run.seed}-{key}"
        with cache_lock(folder):
            if not folder.exists():
                rng = np.random.default_rng([self.run.seed, 7])
                captions = self._draw(prompts, self.config.num_targets, 7)
                renders = np.stack([shapes_world.render(c, rng) for c in captions])
                save_image_folder(torch.from_numpy(renders).permute(0, 3, 1, 2).float() / 255, folder, captions)
        return folder

    def prompt_list(self) -> list[str]:
        if self.config.prompts == "train":
            return shapes_world.captions("train")
        path = Path(self.config.prompts)
        if not path.is_file():
            raise UserInputError(f"gan_rm.prompts: {path} is neither 'train' nor a text file")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise UserInputError(f"gan_rm.prompts: {path} has no prompts")
        return prompts

    def _draw(self, pool: list[str], n: int, key: int) -> list[str]:
        rng = np.random.default_rng([self.run.seed, key])
        return [pool[i] for i in rng.choice(len(pool), size=n, replace=n > len(pool))]

    def _generator(self, path: str) -> DiffusionModel:
        m = self.run.model
        model = DiffusionModel.from_pretrained(
            path, lora_rank=None, reference=False, variant=m.variant, allow_pickle=m.allow_pickle
        )
        return model.to("cuda" if torch.cuda.is_available() else "cpu")

    def _samples(self, model: DiffusionModel, prompts: list[str], directory: Path, seed: int) -> Path:
        if not directory.exists():
            images = sample_candidates(
                model, prompts, 1, num_steps=self.config.num_steps, guidance_scale=self.config.guidance_scale, seed=seed
            )
            save_image_folder(images[:, 0], directory, prompts)
        return directory

    # ------------------------------------------------------------------ one round
    def _model(self, path: str) -> DiffusionModel:
        """The generator at `path`, loaded once for the stages of a round that sample from it."""
        if getattr(self, "_loaded", (None,))[0] != path:
            self._loaded = (path, self._generator(path))
        return self._loaded[1]

    def reward_model(self, k: int, targets: Path, raw: Path, generator_path: str, prompts: list[str]) -> str:
        """Stages `round-k/rm` (and `round-k/pool`, `round-k/rm/init` when bootstrapping): the round's GAN-RM
        trained on the Trainer (`gan-rm-reward`); returns its reward folder."""
        c, root = self.config, self.out / f"round-{k}"
        pool = None
        if c.bootstrap_pool and c.reward_model.bootstrap_top:
            pool = Path(self.stage(f"round-{k}/pool", lambda: str(self._samples(
                self._model(generator_path), self._draw(prompts, c.bootstrap_pool, 200 + k), root / "pool",
                seed=self.run.seed + 1000 * k + 500))))  # fmt: skip
        rm_config = dataclasses.replace(c.reward_model, seed=self.run.seed + k)
        for run in reward_runs(
            targets, raw, root / "rm", rm_config, pool, f"{self.run.recipe or 'gan-rm'}/round-{k}/rm"
        ):
            self.train_stage(run)
        return str(root / "rm" / "final" / "reward")

    def round(self, k: int, generator_path: str, targets: Path, prompts: list[str]) -> tuple[str, dict]:
        c, root = self.config, self.out / f"round-{k}"
        root.mkdir(parents=True, exist_ok=True)
        raw_round = k if c.refresh_raw_negatives else 1
        raw = Path(self.stage(f"round-{raw_round}/raw", lambda: str(self._samples(
            self._model(generator_path), self._draw(prompts, c.raw_negatives, 100 + raw_round),
            self.out / f"round-{raw_round}" / "raw", seed=self.run.seed + 1000 * raw_round))))  # fmt: skip
        rm = self.reward_model(k, targets, raw, generator_path, prompts)

        def pairs() -> dict[str, Any]:
            model = self._model(generator_path)
            write_self_pairs(
                model, self._draw(prompts, c.num_prompts, 300 + k), GanRM(rm, device=model.device),
                root / "pairs", candidates=c.candidates, min_margin=c.min_margin, num_steps=c.num_steps,
                guidance_scale=c.guidance_scale, seed=self.run.seed + 1000 * k + 700, use_reference=False,
                meta={"round": k, "generator": generator_path},
            )  # fmt: skip
            return json.loads((root / "pairs" / "meta.json").read_text())

        made = self.stage(f"round-{k}/pairs", pairs)
        self._loaded = (None, None)  # the round's sampling is done: free the generator before training
        report = self.train_stage(self._train_config(k, generator_path, root))
        rm_report = self.result(f"round-{k}/rm")
        summary = {"round": k, "rm_heldout_auc": rm_report["after"], "pairs": made["pairs"],
                   "before": report["before"], "after": report["after"]}  # fmt: skip
        return str(root / "train" / "final" / "pipeline"), summary

    def _train_config(self, k: int, generator_path: str, root: Path) -> RunConfig:
        """Round k's DPO (or SFT) run on its pairs, from the current generator."""
        method, args = (
            ("diffusion-dpo", self.config.dpo)
            if self.config.update == "dpo"
            else ("diffusion-sft", DiffusionSFTConfig())
        )
        return dataclasses.replace(
            self.run,
            method=method,
            method_args=args,
            recipe=f"{self.run.recipe or 'gan-rm'}/round-{k}",
            output_dir=str(root / "train"),
            model=dataclasses.replace(self.run.model, path=generator_path, save_pipeline=True),
            data=DataConfig(path=str(root / "pairs"), **dataclasses.asdict(self.run.data)),
        )

    # ------------------------------------------------------------------ all rounds
    def run_stages(self) -> dict[str, Any]:
        prompts = self.prompt_list()
        targets = self.target_images(prompts)
        generator = resolve_model_path(self.run.model.path)
        rounds = []
        for k in range(1, self.config.rounds + 1):
            generator, summary = self.round(k, generator, targets, prompts)
            rounds.append(summary)
        first, last = (self.result(f"round-{k}/train") for k in (1, len(rounds)))
        extra: dict[str, Any] = {"update": self.config.update, "eval_prompts": self.run.eval.prompts,
                                 "model": self.run.model.path}  # fmt: skip
        before_png = self.out / "round-1" / "train" / first["samples"]["before"]
        after_png = self.out / f"round-{len(rounds)}" / "train" / last["samples"]["after"]
        if before_png.exists() and after_png.exists():
            (self.out / "samples").mkdir(exist_ok=True)
            with Image.open(before_png) as b, Image.open(after_png) as a:
                side_by_side(b.convert("RGB"), a.convert("RGB")).save(self.out / "samples" / "before_after.png")
            extra["samples"] = {"comparison": "samples/before_after.png"}
        return self.write_report(
            title=f"GAN-RM + {self.config.update.upper()}, {len(rounds)} rounds",
            gold=first["gold_metric"],
            before=first["metrics"]["before"],
            after=last["metrics"]["after"],
            steps=sum(self.result(f"round-{r['round']}/train")["steps"] for r in rounds),
            rows=rounds,
            columns={
                "round": "round",
                "rm_heldout_auc": "RM held-out AUC",
                "pairs": "pairs",
                "before": "gold before",
                "after": "gold after",
            },  # fmt: skip
            description="Each round's RM (`round-k/rm`), pairs (`round-k/pairs`) and training run (`round-k/train`, "
            "with its own report, TensorBoard logs and sample grids) are kept; `samples/before_after.png` compares "
            "round 1's starting model with the last round's result.",
            extra=extra,
        )
