"""RewardCS rounds of on-policy negatives: the recipe end to end on a small mesh set, resume, rater and leak checks.

The run is `configs/mesh/reward_cs_rounds.yaml` from the command line with one round, a small
encoder, a small embedded set (the 16 core prompts) and four templates of training prompts read
from a folder, rated by a rater given as `module:function` (this file's `rater`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import trimesh
import yaml

from mmalign.cli import main
from mmalign.config import ConfigError
from mmalign.mesh import world
from mmalign.mesh.reward import MeshReward
from mmalign.mesh.reward_rounds import WORLD_RATER, load_rater
from mmalign.rewards import load_reward

ROOT = Path(__file__).resolve().parents[1]
R = "reward_cs_rounds"
SMALL = [
    f"{R}.reward.meshes.embedded.prompts=core", f"{R}.reward.meshes.embedded.good_per_prompt=3",
    f"{R}.reward.meshes.embedded.bad_per_prompt=5", f"{R}.reward.meshes.embedded.bad_kinds=[noisy,crumpled,flipped]",
    f"{R}.reward.encoder.points=128", f"{R}.reward.encoder.neighbours=8", f"{R}.reward.encoder.local_width=16",
    f"{R}.reward.encoder.width=32", f"{R}.reward.encoder.embed_dim=32", f"{R}.reward.encoder.head_hidden=32",
    f"{R}.reward.train_draws=2", f"{R}.rounds=1", f"{R}.guidance_steps=20", f"{R}.export_every=10",
    f"{R}.guidance.draws=2", f"{R}.guidance_learning_rate=2e-3", "train.max_steps=100", "train.threads=1",
    "train.checkpoint_every=0", "train.log_every=50",
]  # fmt: skip


def rater(mesh: trimesh.Trimesh, prompt: str) -> float:
    """A user's rater, imported by name: here the mesh world's judge on the 0–5 scale."""
    return 5.0 * world.gold_score(mesh, prompt)


def _templates(folder: Path, prompts: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, prompt in enumerate(prompts):
        world.bad_mesh(prompt, np.random.default_rng([11, i]), "noisy", 0.5).export(folder / f"{i}.ply")
        rows.append({"prompt": prompt, "mesh": f"{i}.ply"})
    (folder / "templates.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def rounds_run(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("rounds")
    templates = _templates(root / "templates", world.prompts("train")[:4])
    args = ["train", str(ROOT / "configs/mesh/reward_cs_rounds.yaml"), f"output_dir={root / 'run'}", *SMALL,
            f"{R}.templates={templates}", f"{R}.rater=tests.test_mesh_reward_rounds:rater"]  # fmt: skip
    assert main(args) == 0
    return root / "run", json.loads((root / "run" / "report.json").read_text())


@pytest.mark.slow
def test_a_round_adds_the_rated_guided_meshes_to_training_and_the_reward_learns_them(rounds_run):
    out, report = rounds_run
    rated = [json.loads(line) for line in (out / "round-1" / "rated.jsonl").read_text().splitlines()]
    assert len(rated) == 4 * 2  # four templates exported at steps 10 and 20; step 0 (the templates) is not rated
    assert {r["kind"] for r in rated} == {"guided-round-1"} and {r["split"] for r in rated} == {"train"}
    for row in rated:
        assert Path(row["mesh"]).is_absolute() and Path(row["mesh"]).is_file()
        assert row["score"] == pytest.approx(rater(trimesh.load(row["mesh"], force="mesh"), row["prompt"]), abs=1e-3)
    merged = [json.loads(line) for line in (out / "round-1" / "set" / "meshes.jsonl").read_text().splitlines()]
    assert merged[-len(rated) :] == rated and {r["split"] for r in merged} == {"train", "heldout"}
    assert not {r["prompt"] for r in merged if r["split"] == "heldout"} & {r["prompt"] for r in rated}
    # the effect a round is for: the retrained reward agrees better with the rater on the meshes guidance
    # pushed its predecessor's reward towards (its own hacks) than that predecessor did
    meshes, prompts = [r["mesh"] for r in rated], [r["prompt"] for r in rated]
    rating = np.array([r["score"] for r in rated]) / 5
    errors = [
        float(np.abs(load_reward(str(folder))(meshes, prompts, progress=False).numpy() - rating).mean())
        for folder in (out / "round-0/reward/final/reward", out / "final/reward")
    ]
    assert errors[1] < errors[0], errors
    assert isinstance(load_reward(str(out / "final/reward")), MeshReward) and report["saved"] == ["final/reward"]
    assert report["gold_metric"] == "heldout_pairwise_accuracy" and len(report["rounds"]) == 1
    assert report["rounds"][0]["rated_meshes"] == 8 and 0.0 <= report["rounds"][0]["guided_rating"] <= 1.0
    assert "| 1 | 8 |" in (out / "report.md").read_text()
    assert (out / "round-1/guide/samples").is_dir() and (out / "round-1/reward/report.md").is_file()


@pytest.mark.slow
def test_a_finished_run_is_reused_stage_by_stage(rounds_run):
    out, report = rounds_run
    stamps = {p: p.stat().st_mtime_ns for p in (out / "round-1/rated.jsonl", out / "round-1/reward/report.json")}
    config = yaml.safe_load((out / "config.yaml").read_text())
    overrides = [f"output_dir={out}", *SMALL, f"{R}.templates={config[R]['templates']}",
                 f"{R}.rater=tests.test_mesh_reward_rounds:rater"]  # fmt: skip
    assert main(["train", str(ROOT / "configs/mesh/reward_cs_rounds.yaml"), *overrides]) == 0
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    assert json.loads((out / "report.json").read_text())["after"] == report["after"]


def test_templates_of_heldout_prompts_are_refused_before_any_training(tmp_path, capsys):
    templates = _templates(tmp_path / "templates", [world.HELDOUT[0]])
    args = ["train", str(ROOT / "configs/mesh/reward_cs_rounds.yaml"), f"output_dir={tmp_path / 'run'}", *SMALL,
            f"{R}.templates={templates}"]  # fmt: skip
    assert main(args) == 2
    assert "are held out of reward training" in capsys.readouterr().err
    assert not (tmp_path / "run" / "round-0").exists()


def test_raters_are_the_world_judge_or_a_named_function():
    mesh, prompt = world.good_mesh("a torus", np.random.default_rng(0)), "a torus"
    assert load_rater(WORLD_RATER)(mesh, prompt) == pytest.approx(5.0 * world.gold_score(mesh, prompt))
    assert load_rater("tests.test_mesh_reward_rounds:rater") is rater
    for bad, message in (("gold", "package.module:function"), ("tests.nowhere:rater", "cannot import"),
                         ("tests.test_mesh_reward_rounds:R", "not callable")):  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            load_rater(bad)


def test_a_score_outside_zero_to_five_names_the_rater_and_the_mesh(tmp_path):
    from mmalign.config import load_config
    from mmalign.mesh.reward_rounds import RewardRounds

    step = _templates(tmp_path / "guide" / "meshes" / "step-000010", ["a torus"])
    rounds = RewardRounds(load_config(ROOT / "configs/mesh/reward_cs_rounds.yaml", [f"output_dir={tmp_path}"]))
    with pytest.raises(ConfigError, match=r"scored .*0\.ply 7\.0; scores must lie in \[0, 5\]"):
        rounds.rate(1, tmp_path / "guide", lambda mesh, prompt: 7.0)
    assert not (tmp_path / "round-1" / "rated.jsonl").exists()
    assert step.is_dir()
