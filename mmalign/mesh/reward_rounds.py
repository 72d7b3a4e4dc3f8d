"""Rounds of on-policy negatives for a mesh reward (`method: reward-cs-rounds`; ours, the GAN-RM idea on meshes).

A reward trained once on a fixed mesh set is optimised against by guided generation, and the
guidance finds meshes the set never showed it: folded surfaces and warped parts that it scores
high (docs/results/mesh.md, "Surface-only guidance"). Each round shows the reward its own hacks:

0. `round-0/reward/`: RewardCS trained on `data.path` (the `reward` section, as `method: reward-cs`).
k. (k = 1…K)
   1. `round-k/guide/`: `method: mesh-guided` with round k−1's reward on templates of *training*
      prompts (`templates`; the embedded ones are re-drawn every round), exported every `export_every`
      steps;
   2. `round-k/rated.jsonl`: every exported mesh after step 0 scored by the `rater`, in [0, 5]: the same
      rater that scored the base set (`embedded:mesh-gold` = 5 × the mesh world's gold judge, the
      rater behind `embedded:meshes`; or your own `package.module:function(mesh, prompt) -> score`);
   3. `round-k/set/meshes.jsonl`: the base set's rows (with explicit splits) plus every round's rated
      rows so far, all in the training split;
   4. `round-k/reward/`: RewardCS retrained from scratch on that set.

Every stage is recorded when complete (`mmalign.train.stages`) and the training stages resume from
their own checkpoints, so a killed run goes on where it stopped; a changed config is refused.
`final/reward` is the last round's reward.
`report.json` holds the held-out pairwise accuracy of round 0's reward (`before`) and of the last
round's (`after`), and per round the reward's held-out metrics and the rater's mean score of the
meshes its predecessor guided towards (how far guidance could hack it, ÷ 5 to [0, 1]).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import trimesh

from mmalign.config import ConfigError, RunConfig, option
from mmalign.io import atomic_directory, atomic_write_text
from mmalign.mesh import world
from mmalign.mesh.data import (
    MAX_SCORE,
    MESHES_JSONL,
    MeshDataConfig,
    MeshRow,
    read_mesh_rows,
    resolve_mesh_source,
    split_rows,
)
from mmalign.mesh.guided import MeshGuidedConfig
from mmalign.mesh.io import load_mesh
from mmalign.mesh.reward_cs import RewardCSConfig
from mmalign.mesh.templates import TEMPLATES_JSONL, EmbeddedTemplatesConfig, TemplateDataConfig, load_templates
from mmalign.registry import EMBEDDED_PREFIX, import_string
from mmalign.train.stages import StagedRecipe

WORLD_RATER = "embedded:mesh-gold"
Rater = Callable[[trimesh.Trimesh, str], float]


def _guidance_defaults() -> MeshGuidedConfig:
    """Guidance that can move single vertices (plain offsets, low-pass anchor), so the hacks it finds are the
    ones a reward must learn to refuse; α 1 → 2 against a reward trained on scores ÷ 5."""
    templates = EmbeddedTemplatesConfig(split="train")
    return MeshGuidedConfig(alpha_min=1.0, alpha_max=2.0, smoothing=0.0, anchor_smoothing=10.0, templates=templates)


@dataclass
class RewardRoundsConfig:
    """Options of mesh reward rounds (section `reward_cs_rounds`)."""

    rounds: int = option("guide → rate → retrain rounds after round 0's reward", 3)
    rater: str = option(
        "scores every guided mesh in [0, 5]: embedded:mesh-gold (5 × the mesh world's gold judge, mesh-world prompts "
        "only) or `package.module:function` taking (trimesh.Trimesh, prompt) — your rater, imported by name",
        WORLD_RATER,
    )
    templates: str = option(
        "templates guided every round: embedded:mesh-templates (the mesh world's, `guidance.templates`, re-drawn "
        "each round) or a templates.jsonl folder; their prompts must be training prompts of the mesh set",
        f"{EMBEDDED_PREFIX}mesh-templates",
    )
    guidance_steps: int = option("optimisation steps of each round's guidance", 200)
    guidance_learning_rate: float = option("Adam learning rate of each round's guidance", 5e-4)
    export_every: int = option(
        "export (and rate) the guided meshes every N steps; step 0, the templates themselves, is not rated", 50
    )
    guidance: MeshGuidedConfig = option(
        "how each round guides (its `rewards` are replaced by the previous round's reward)",
        default_factory=_guidance_defaults,
    )
    reward: RewardCSConfig = option(
        "how each round's RewardCS is trained (the run's `train` section gives its steps and optimiser)",
        default_factory=RewardCSConfig,
    )


def load_rater(name: str) -> Rater:
    """`embedded:mesh-gold` or `package.module:function` → a callable `(mesh, prompt) -> score in [0, 5]`."""
    if name == WORLD_RATER:
        return lambda mesh, prompt: MAX_SCORE * world.gold_score(mesh, prompt)
    if ":" not in name:
        raise ConfigError(f"reward_cs_rounds.rater: expected {WORLD_RATER} or package.module:function, got {name!r}")
    try:
        rater = import_string(name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"reward_cs_rounds.rater: cannot import {name!r}: {exc}") from None
    if not callable(rater):
        raise ConfigError(f"reward_cs_rounds.rater: {name!r} is not callable")
    return rater


def _row(row: MeshRow, split: str) -> dict[str, Any]:
    return {"prompt": row.prompt, "mesh": str(row.mesh.resolve()), "score": row.score, "split": split,
            "kind": row.kind}  # fmt: skip


class RewardRounds(StagedRecipe):
    """The rounds as stages of one run (`mmalign.train.stages`)."""

    config_class = RewardRoundsConfig
    data_config_class = MeshDataConfig
    config: RewardRoundsConfig

    def __init__(self, run: RunConfig):
        super().__init__(run)
        if self.config.rounds < 1:
            raise ConfigError(f"reward_cs_rounds.rounds must be at least 1, got {self.config.rounds}")
        if self.config.export_every < 1 or self.config.guidance_steps < 1:
            raise ConfigError("reward_cs_rounds.export_every and guidance_steps must be at least 1")

    # ------------------------------------------------------------------ stages
    def base_rows(self) -> list[dict[str, Any]]:
        """The base set's usable rows as `meshes.jsonl` objects with absolute paths and explicit splits."""
        meshes = self.config.reward.meshes
        source = resolve_mesh_source(self.run.data, meshes)
        train, heldout = split_rows(read_mesh_rows(source, meshes), meshes, str(source))
        return [_row(r, "train") for r in train] + [_row(r, "heldout") for r in heldout]

    def train_reward(self, root: Path, data_path: str) -> str:
        """Stage `root/reward`: RewardCS on `data_path`; returns its reward folder."""
        directory = root / "reward"
        self.train_stage(dataclasses.replace(
            self.run, method="reward-cs", method_args=self.config.reward, output_dir=str(directory),
            recipe=f"{self.run.recipe or 'reward-cs-rounds'}/{root.name}",
            data=dataclasses.replace(self.run.data, path=data_path),
        ))  # fmt: skip
        return str(directory / "final" / "reward")

    def templates_config(self, k: int) -> EmbeddedTemplatesConfig:
        """Round k's embedded templates: the `guidance.templates` options with their seed moved on by k."""
        return dataclasses.replace(self.config.guidance.templates, seed=self.config.guidance.templates.seed + k)

    def check_templates(self, heldout_prompts: set[str]) -> None:
        """Refuse templates whose prompts are held out (their rated meshes would leak into training)."""
        leaked = sorted({t.prompt for t in load_templates(self.config.templates, self.templates_config(1))}
                        & heldout_prompts)  # fmt: skip
        if leaked:
            raise ConfigError(
                f"reward_cs_rounds.templates: prompts {leaked} are held out of reward training; "
                "guiding on them would leak the held-out prompts into the training set"
            )

    def guide(self, k: int, reward: str) -> Path:
        """Stage `round-k/guide`: guidance with `reward`; returns that run directory."""
        c, directory = self.config, self.out / f"round-{k}" / "guide"
        guidance = dataclasses.replace(c.guidance, rewards=[reward], templates=self.templates_config(k))
        train = dataclasses.replace(
            self.run.train, max_steps=c.guidance_steps, learning_rate=c.guidance_learning_rate,
            lr_scheduler="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=None,
            checkpoint_every=c.export_every, gradient_accumulation_steps=1,
        )  # fmt: skip
        self.train_stage(dataclasses.replace(
            self.run, method="mesh-guided", method_args=guidance, output_dir=str(directory),
            recipe=f"{self.run.recipe or 'reward-cs-rounds'}/round-{k}/guide", train=train,
            data=TemplateDataConfig(path=c.templates),
            eval=dataclasses.replace(self.run.eval, every=c.export_every),
        ))  # fmt: skip
        return directory

    def rate(self, k: int, guide: Path, rater: Rater) -> list[dict[str, Any]]:
        """Rows of every mesh exported after step 0 by round k's guidance, scored by the rater."""
        file = self.out / f"round-{k}" / "rated.jsonl"
        if not file.is_file():
            rows = []
            for step in sorted(p for p in (guide / "meshes").glob("step-*") if int(p.name[5:]) > 0):
                for line in (step / TEMPLATES_JSONL).read_text().splitlines():
                    item = json.loads(line)
                    path = (step / item["mesh"]).resolve()
                    score = float(rater(load_mesh(path), item["prompt"]))
                    if not 0.0 <= score <= MAX_SCORE:
                        raise ConfigError(
                            f"reward_cs_rounds.rater {self.config.rater!r} scored {path} {score!r}; "
                            f"scores must lie in [0, {MAX_SCORE:g}]"
                        )
                    rows.append({"prompt": item["prompt"], "mesh": str(path), "score": round(score, 4),
                                 "split": "train", "kind": f"guided-round-{k}"})  # fmt: skip
            atomic_write_text(file, "".join(json.dumps(r) + "\n" for r in rows))
        return [json.loads(line) for line in file.read_text().splitlines()]

    def write_set(self, k: int, rows: list[dict[str, Any]]) -> str:
        directory = self.out / f"round-{k}" / "set"
        if not (directory / MESHES_JSONL).is_file():
            with atomic_directory(directory) as tmp:
                (tmp / MESHES_JSONL).write_text("".join(json.dumps(r) + "\n" for r in rows))
        return str(directory)

    # ------------------------------------------------------------------ all rounds
    def run_stages(self) -> dict[str, Any]:
        rater = load_rater(self.config.rater)
        rows = self.base_rows()
        self.check_templates({r["prompt"] for r in rows if r["split"] == "heldout"})
        reward = self.train_reward(self.out / "round-0", self.run.data.path)
        rounds = []
        for k in range(1, self.config.rounds + 1):
            guide = self.guide(k, reward)
            rated = self.stage(f"round-{k}/rated.jsonl", lambda k=k, guide=guide: self.rate(k, guide, rater))
            rows = rows + rated
            data = self.stage(f"round-{k}/set", lambda k=k, rows=rows: self.write_set(k, rows))
            reward = self.train_reward(self.out / f"round-{k}", data)
            rounds.append({"round": k, "rated": rated, "guide": guide})

        def final() -> list[str]:
            with atomic_directory(self.out / "final") as tmp:
                shutil.copytree(reward, tmp / "reward")
            return ["final/reward"]

        self.stage("final", final)
        return self._report(rounds)

    def _report(self, rounds: list[dict[str, Any]]) -> dict[str, Any]:
        rewards = [self.result(f"round-{k}/reward") for k in range(len(rounds) + 1)]
        first, last = rewards[0], rewards[-1]
        table = []
        for r in rounds:
            metrics = rewards[r["round"]]["metrics"]["after"]
            guide = self.result(f"round-{r['round']}/guide")
            table.append({
                "round": r["round"],
                "rated_meshes": len(r["rated"]),
                "guided_rating": float(np.mean([row["score"] for row in r["rated"]])) / MAX_SCORE,
                "guided_reward": guide["metrics"]["after"]["reward"],
                "heldout_pairwise_accuracy": metrics["heldout_pairwise_accuracy"],
                "heldout_auroc": metrics["heldout_auroc"],
            })  # fmt: skip
        return self.write_report(
            title=f"RewardCS with {len(rounds)} rounds of on-policy negatives",
            gold=first["gold_metric"],
            before=first["metrics"]["after"],  # round 0's trained reward
            after=last["metrics"]["after"],
            steps=sum(reward["steps"] for reward in rewards),
            rows=table,
            columns={
                "round": "round",
                "rated_meshes": "meshes rated",
                "guided_rating": "rating of the meshes guided by the previous reward (÷ 5)",
                "guided_reward": "their reward",
                "heldout_pairwise_accuracy": "held-out pairwise acc.",
                "heldout_auroc": "held-out AUROC",
            },  # fmt: skip
            description=f"Before: round 0, RewardCS on `{self.run.data.path}`; held-out prompts no round trained on. "
            f"Rater: `{self.config.rater}`. A rating that stays low while the guided reward is high is a hack the "
            "next round learns to refuse. Each round keeps its guidance run (`round-k/guide`, with renders in its "
            "sample grids), its rated rows (`round-k/rated.jsonl`), its mesh set and its reward; `final/reward` is "
            "the last one: `mesh_guided.rewards=[<this run>/final/reward]`.",
            extra={"saved": ["final/reward"]},
        )
