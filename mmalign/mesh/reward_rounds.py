"""Rounds of on-policy negatives for a mesh reward (`method: reward-cs-rounds`; ours, the GAN-RM idea on meshes).

A reward trained once on a fixed mesh set is optimised against by guided generation, and the
guidance finds meshes the set never showed it: folded surfaces and warped parts that it scores
high (README, "Measured guidance"). Each round shows the reward its own hacks:

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

Every stage is skipped when its output is complete, and the training stages resume from their own
checkpoints, so a killed run goes on where it stopped. `final/reward` is the last round's reward.
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

from mmalign.config import ConfigError, EvalSchedule, RunConfig, option
from mmalign.io import atomic_directory, atomic_write_json, atomic_write_text
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


class RewardRounds:
    """Runs the rounds; `mmalign.train` calls `run_all()` for recipes that are not a single loop."""

    config_class = RewardRoundsConfig
    model_config_class = None
    data_config_class = MeshDataConfig
    eval_config_class = EvalSchedule

    def __init__(self, run: RunConfig):
        self.run = run
        self.config: RewardRoundsConfig = run.method_args
        if self.config.rounds < 1:
            raise ConfigError(f"reward_cs_rounds.rounds must be at least 1, got {self.config.rounds}")
        if self.config.export_every < 1 or self.config.guidance_steps < 1:
            raise ConfigError("reward_cs_rounds.export_every and guidance_steps must be at least 1")
        self.out = Path(run.output_dir)

    # ------------------------------------------------------------------ stages
    def base_rows(self) -> list[dict[str, Any]]:
        """The base set's usable rows as `meshes.jsonl` objects with absolute paths and explicit splits."""
        meshes = self.config.reward.meshes
        source = resolve_mesh_source(self.run.data, meshes)
        train, heldout = split_rows(read_mesh_rows(source, meshes), meshes, str(source))
        return [_row(r, "train") for r in train] + [_row(r, "heldout") for r in heldout]

    def train_reward(self, root: Path, data_path: str) -> str:
        """RewardCS on `data_path` into `root/reward`; returns its reward folder."""
        import mmalign.train as training

        directory = root / "reward"
        if not (directory / "report.json").is_file():
            training.run(dataclasses.replace(
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
        """Round k's guidance with `reward` into `round-k/guide`; returns that run directory."""
        import mmalign.train as training

        c, directory = self.config, self.out / f"round-{k}" / "guide"
        guidance = dataclasses.replace(c.guidance, rewards=[reward], templates=self.templates_config(k))
        if not (directory / "report.json").is_file():
            train = dataclasses.replace(
                self.run.train, max_steps=c.guidance_steps, learning_rate=c.guidance_learning_rate,
                lr_scheduler="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=None,
                checkpoint_every=c.export_every, gradient_accumulation_steps=1,
            )  # fmt: skip
            training.run(dataclasses.replace(
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
    def run_all(self) -> dict[str, Any]:
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out / "config.json", self.run.to_dict())
        rater = load_rater(self.config.rater)
        rows = self.base_rows()
        self.check_templates({r["prompt"] for r in rows if r["split"] == "heldout"})
        reward = self.train_reward(self.out / "round-0", self.run.data.path)
        rounds = []
        for k in range(1, self.config.rounds + 1):
            guide = self.guide(k, reward)
            rated = self.rate(k, guide, rater)
            rows = rows + rated
            reward = self.train_reward(self.out / f"round-{k}", self.write_set(k, rows))
            rounds.append({"round": k, "rated": rated, "guide": guide})
        with atomic_directory(self.out / "final") as tmp:
            shutil.copytree(reward, tmp / "reward")
        return self._report(rounds)

    def _report(self, rounds: list[dict[str, Any]]) -> dict[str, Any]:
        rewards = [json.loads((self.out / f"round-{k}" / "reward" / "report.json").read_text())
                   for k in range(len(rounds) + 1)]  # fmt: skip
        first, last = rewards[0], rewards[-1]
        table = []
        for r in rounds:
            metrics = rewards[r["round"]]["metrics"]["after"]
            guide = json.loads((r["guide"] / "report.json").read_text())
            table.append({
                "round": r["round"],
                "rated_meshes": len(r["rated"]),
                "guided_rating": float(np.mean([row["score"] for row in r["rated"]])) / MAX_SCORE,
                "guided_reward": guide["metrics"]["after"]["reward"],
                "heldout_pairwise_accuracy": metrics["heldout_pairwise_accuracy"],
                "heldout_auroc": metrics["heldout_auroc"],
            })  # fmt: skip
        report = {
            "recipe": self.run.recipe or self.run.method,
            "method": self.run.method,
            "steps": sum(reward["steps"] for reward in rewards),
            "gold_metric": first["gold_metric"],
            "before": first["after"],
            "after": last["after"],
            "delta": last["after"] - first["after"],
            "metrics": {"before": first["metrics"]["after"], "after": last["metrics"]["after"]},
            "rounds": table,
            "saved": ["final/reward"],
        }
        atomic_write_json(self.out / "report.json", report)
        lines = [
            f"# {report['recipe']}: RewardCS with {len(rounds)} rounds of on-policy negatives",
            "",
            f"Held-out pairwise accuracy (prompts no round trained on): **{report['before']:.4f} → "
            f"{report['after']:.4f}** ({report['delta']:+.4f}); round 0 is RewardCS on `{self.run.data.path}`.",
            "",
            "| round | meshes rated | rating of the meshes guided by the previous reward (÷ 5) | their reward "
            "| held-out pairwise acc. | held-out AUROC |",
            "|---|---|---|---|---|---|",
            *[
                f"| {r['round']} | {r['rated_meshes']} | {r['guided_rating']:.3f} | {r['guided_reward']:.3f} "
                f"| {r['heldout_pairwise_accuracy']:.3f} | {r['heldout_auroc']:.3f} |"
                for r in table
            ],
            "",
            f"Rater: `{self.config.rater}`. A rating that stays low while the guided reward is high is a hack the "
            "next round learns to refuse. Each round keeps its guidance run (`round-k/guide`, with renders in its "
            "sample grids), its rated rows (`round-k/rated.jsonl`), its mesh set and its reward; `final/reward` is "
            "the last one: `mesh_guided.rewards=[<this run>/final/reward]`.",
        ]
        atomic_write_text(self.out / "report.md", "\n".join(lines) + "\n")
        return report
