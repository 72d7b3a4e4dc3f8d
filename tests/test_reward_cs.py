"""RewardCS and its Bradley–Terry baseline: the BT loss, training on the mesh world, the saved reward, the CLI.

The RewardCS run is the shipped recipe from the command line with small overrides (fewer meshes,
a smaller encoder, 120 steps) on the world's local geometric corruptions (noise, crumpling,
flipped patches). Holes are left out here: a hole covers ≈ 3 % of the surface, about
the spacing of 128–256 surface samples, and measured held-out AUROC on holed meshes stays ≈ 0.5.
The run's result is reused by the scoring tests.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import trimesh

import mmalign
from mmalign.cli import main
from mmalign.config import ConfigError, load_config
from mmalign.errors import UserInputError
from mmalign.losses import bradley_terry_loss, cs_divergence
from mmalign.mesh import world
from mmalign.mesh.data import read_mesh_rows, resolve_mesh_source, split_rows
from mmalign.mesh.reward import MeshReward
from mmalign.mesh.reward_cs import RewardCS
from mmalign.rewards import load_reward

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = [
    "meshes.embedded.prompts=core",
    "meshes.embedded.good_per_prompt=6",
    "meshes.embedded.bad_per_prompt=8",
    "meshes.embedded.bad_kinds=[noisy,crumpled,flipped]",
]  # the 16 core prompts: 224 meshes, not 1288
ENCODER = [
    "encoder.points=128",
    "encoder.neighbours=8",
    "encoder.local_width=16",
    "encoder.width=32",
    "encoder.embed_dim=32",
    "encoder.head_hidden=32",
]
FAST = ["train.max_steps=120", "train.threads=1", "eval.every=0", "train.checkpoint_every=0", "train.log_every=40"]


def _overrides(section: str, out: Path, *extra: str) -> list[str]:
    return [f"output_dir={out}", *FAST, *(f"{section}.{o}" for o in EMBEDDED + ENCODER), *extra]


@pytest.fixture(scope="module")
def cs_run(tmp_path_factory) -> tuple[Path, dict]:
    """`mmalign train configs/mesh/reward_cs.yaml` with small overrides: (run directory, report)."""
    out = tmp_path_factory.mktemp("reward-cs")
    overrides = _overrides("reward_cs", out, "reward_cs.train_draws=2")  # two surface draws per training mesh
    assert main(["train", str(ROOT / "configs/mesh/reward_cs.yaml"), *overrides]) == 0
    return out, json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def heldout(cs_run) -> list:
    """The held-out rows of the run's mesh set (prompts training never saw)."""
    run = load_config(cs_run[0] / "config.yaml")
    meshes = run.method_args.meshes
    return split_rows(read_mesh_rows(resolve_mesh_source(run.data, meshes), meshes), meshes, "set")[1]


def test_bradley_terry_loss_invariants():
    r = torch.tensor([0.3, -1.2, 2.0])
    assert bradley_terry_loss(r, r).item() == pytest.approx(math.log(2))
    w = torch.tensor([0.5, -1.0, 3.0], dtype=torch.float64, requires_grad=True)
    lo = torch.tensor([0.0, 1.0, -2.0], dtype=torch.float64, requires_grad=True)
    loss = bradley_terry_loss(w, lo)
    reference = sum(math.log1p(math.exp(-(a - b))) for a, b in zip(w.tolist(), lo.tolist())) / 3
    assert loss.item() == pytest.approx(reference, rel=1e-12)
    loss.backward()
    assert (w.grad < 0).all() and (lo.grad > 0).all()  # descent raises winners, lowers losers
    torch.testing.assert_close(w.grad, -lo.grad)
    expected = torch.tensor([-1 / (1 + math.exp(a - b)) / 3 for a, b in zip(w.tolist(), lo.tolist())], dtype=w.dtype)
    torch.testing.assert_close(w.grad, expected)
    assert bradley_terry_loss(w + 5, lo + 5).item() == pytest.approx(loss.item())  # only differences matter
    assert bradley_terry_loss(torch.tensor([100.0]), torch.tensor([-100.0])).item() < 1e-30
    assert math.isfinite(bradley_terry_loss(torch.tensor([-100.0]), torch.tensor([100.0])).item())
    with pytest.raises(ValueError, match=r"\(B,\)"):
        bradley_terry_loss(torch.zeros(3), torch.zeros(2))


def test_reward_cs_recipe_separates_the_heldout_sets(cs_run):
    out, report = cs_run
    assert report["recipe"] == "mesh/reward_cs" and report["gold_metric"] == "heldout_pairwise_accuracy"
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    # chance is 0.5; seeds 0, 1, 2 of this run measured AUROC 0.87, 0.80, 0.80 (pairwise 0.88, 0.76, 0.82),
    # so the bar here is "clearly above chance"; the full recipe's figures are in docs/results/mesh.md
    assert after["heldout_pairwise_accuracy"] > 0.7 and after["heldout_auroc"] > 0.7, after
    assert after["heldout_cs"] > before["heldout_cs"] and after["heldout_mse"] < before["heldout_mse"]
    assert {"heldout_auroc/noisy", "heldout_auroc/flipped"} <= set(after)
    assert "heldout_auroc" in (out / "report.md").read_text()
    assert (out / "final/reward/model.safetensors").is_file() and report["saved"] == ["final/reward"]


def test_train_draws_below_one_is_refused():
    with pytest.raises(ConfigError, match="'reward_cs.train_draws' must be ≥ 1"):
        load_config(ROOT / "configs/mesh/reward_cs.yaml", ["reward_cs.train_draws=0"])


def test_objective_is_score_regression_minus_lambda_cs_and_pushes_the_sets_apart():
    method = RewardCS(load_config(ROOT / "configs/mesh/reward_cs.yaml", ["reward_cs.cs_weight=0.5"]))
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(16, 8, generator=generator, requires_grad=True)
    rewards, targets = torch.rand(16, generator=generator), torch.rand(16, generator=generator)
    loss, metrics = method.objective(embeddings, rewards, targets, n=8)
    cs = cs_divergence(embeddings[:8], embeddings[8:])
    assert loss.item() == pytest.approx((rewards - targets).pow(2).mean().item() - 0.5 * cs.item(), rel=1e-6)
    assert metrics["cs"].item() == pytest.approx(cs.item()) and not metrics["cs"].requires_grad
    loss.backward()
    with torch.no_grad():
        stepped = embeddings - 0.1 * embeddings.grad
    assert cs_divergence(stepped[:8], stepped[8:]) > cs  # a descent step separates the two sets more


def test_saved_reward_scores_meshes_as_in_training(cs_run, heldout):
    folder = cs_run[0] / "final/reward"
    reward = load_reward(str(folder))
    assert isinstance(reward, MeshReward) and reward.name == "reward-cs" and reward.needs_prompts
    paths, prompts = [str(r.mesh) for r in heldout], [r.prompt for r in heldout]
    scores = reward(paths, prompts)
    preferred = torch.tensor([r.preferred for r in heldout])
    win, lose = scores[preferred], scores[~preferred]
    auroc = float((win[:, None] > lose[None]).float().mean() + 0.5 * (win[:, None] == lose[None]).float().mean())
    assert auroc == pytest.approx(reward.metrics["heldout_auroc"], abs=1e-6)  # the same inputs as evaluation
    again = mmalign.load_reward("reward-cs", path=str(folder))(paths[:4], prompts[:4])
    torch.testing.assert_close(again, scores[:4], atol=1e-6, rtol=0)  # other batches: float rounding only
    objects = [trimesh.load(p, process=False) for p in paths[:4]]
    torch.testing.assert_close(reward(objects, prompts[:4]), reward(paths[:4], prompts[:4]), atol=0, rtol=0)
    one = reward(paths[0], prompts[0])
    perm = np.random.default_rng(0).permutation(len(objects[0].faces))
    reordered = trimesh.Trimesh(objects[0].vertices, np.roll(objects[0].faces[perm], 1, axis=1), process=False)
    assert reward(reordered, prompts[0]).item() == one.item()  # vertex/face order does not matter
    reward.config.sample_seed = 1  # other surface samples: the score moves little next to the classes' gap
    reseeded = reward(paths, prompts)
    gap = float(win.mean() - lose.mean())
    assert gap > 0.3 and float((reseeded - scores).abs().mean()) < 0.25 * gap  # measured: 0.15 × gap
    win, lose = reseeded[preferred], reseeded[~preferred]
    assert float((win[:, None] > lose[None]).float().mean()) > auroc - 0.1
    with pytest.raises(UserInputError, match="pass path="):
        load_reward("reward-bt")  # nothing shipped for the baseline
    shipped = load_reward("reward-cs")  # the shipped RewardCS (embedded:mesh-reward-cs)
    assert shipped.name == "reward-cs" and shipped.metrics["heldout_pairwise_accuracy"] > 0.6  # trained, not chance
    assert load_reward("embedded:mesh-reward-cs")(paths[:2], prompts[:2]).shape == (2,)


def test_cli_scores_a_folder_of_meshes(cs_run, tmp_path, capsys):
    meshes = tmp_path / "meshes"
    meshes.mkdir()
    rng = np.random.default_rng(11)
    world.good_mesh("a torus", rng).export(meshes / "good.glb")
    world.bad_mesh("a torus", rng, "noisy").export(meshes / "noisy.obj")
    world.bad_mesh("a torus", rng, "crumpled").export(meshes / "crumpled.ply")
    (meshes / "notes.txt").write_text("not a mesh")
    folder = cs_run[0] / "final/reward"
    args = [
        "score",
        "--reward",
        "reward-cs",
        "--reward-arg",
        f"path={folder}",
        str(meshes),
        "--prompt",
        "a torus",
        "--json",
        str(tmp_path / "s.json"),
    ]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[-1] == "reward-cs" and len(lines) == 4
    scores = {Path(r["file"]).stem: r["score"] for r in json.loads((tmp_path / "s.json").read_text())["scores"]}
    assert set(scores) == {"good", "noisy", "crumpled"}
    assert scores["good"] > max(scores["noisy"], scores["crumpled"]), scores
    assert main(["score", "--reward", str(folder), str(meshes / "good.glb"), "--prompt", "a torus"]) == 0
    assert capsys.readouterr().out.split()[-1] == f"{scores['good']:.4f}"
    (tmp_path / "empty").mkdir()
    assert main(["score", "--reward", str(folder), str(tmp_path / "empty"), "--prompt", "a torus"]) == 2
    assert "no mesh files inside" in capsys.readouterr().err
    assert main(["score", "--reward", "reward-bt", str(meshes / "good.glb"), "--prompt", "a torus"]) == 2
    assert "path=" in capsys.readouterr().err
    assert main(["score", "--reward", str(folder), str(meshes / "notes.txt"), "--prompt", "a torus"]) == 2
    assert "unsupported mesh format" in capsys.readouterr().err


def test_python_scores_a_folder_of_meshes_like_its_files(cs_run, tmp_path):
    meshes = tmp_path / "meshes"
    (meshes / "sub").mkdir(parents=True)
    rng = np.random.default_rng(12)
    world.good_mesh("a cone", rng).export(meshes / "a_good.obj")
    world.bad_mesh("a cone", rng, "noisy").export(meshes / "sub" / "b_noisy.ply")
    (meshes / "readme.md").write_text("not a mesh")
    reward = load_reward(str(cs_run[0] / "final/reward"))
    files = [str(meshes / "a_good.obj"), str(meshes / "sub" / "b_noisy.ply")]
    torch.testing.assert_close(reward(meshes, "a cone"), reward(files, "a cone"), atol=0, rtol=0)
    torch.testing.assert_close(
        mmalign.score(str(meshes), "a cone", reward=str(cs_run[0] / "final/reward")),
        reward(files, "a cone"),
        atol=0,
        rtol=0,
    )
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no mesh files inside"):
        reward(tmp_path / "empty", "a cone")


def test_bradley_terry_baseline_trains_on_same_prompt_pairs(tmp_path):
    report = mmalign.train(ROOT / "configs/mesh/reward_bt.yaml", *_overrides("reward_bt", tmp_path))
    before, after = report["metrics"]["before"], report["metrics"]["after"]
    assert report["method"] == "reward-bt" and "heldout_mse" not in after
    assert after["heldout_pairwise_accuracy"] > max(0.75, before["heldout_pairwise_accuracy"]), (before, after)
    reward = load_reward(str(tmp_path / "final/reward"))
    assert reward.name == "reward-bt" and reward.metrics["heldout_pairwise_accuracy"] == pytest.approx(
        after["heldout_pairwise_accuracy"]
    )


def test_batches_below_the_per_class_minimum_are_refused():
    run = load_config(ROOT / "configs/mesh/reward_cs.yaml", ["train.batch_size=6"])
    with pytest.raises(ConfigError, match="min_per_class=8"):
        RewardCS(run).setup(SimpleNamespace(num_processes=1))
    run = load_config(ROOT / "configs/mesh/reward_cs.yaml", ["train.batch_size=14"])
    with pytest.raises(ConfigError, match="7 meshes of each class per process"):
        RewardCS(run).setup(SimpleNamespace(num_processes=2))


def test_the_shipped_contact_reward_prefers_resting_parts_to_floating_and_sunk_ones():
    """`embedded:mesh-reward-cs-contact` (scripts/train_mesh_reward.py --asset contact) on held-out compositions."""
    reward = load_reward("reward-cs", path="embedded:mesh-reward-cs-contact")
    assert reward.config.part_contact
    assert reward.points(world.good_mesh("a torus", np.random.default_rng(0))).shape[-1] == 7  # xyz, normal, part
    wins = []
    for prompt in ("a sphere on a cylinder", "a torus on a cube"):
        for seed in range(4):
            resting = world.good_mesh(prompt, np.random.default_rng(seed))
            floating = world.floating_mesh(prompt, np.random.default_rng(seed))
            sunk = world.bad_mesh(prompt, np.random.default_rng(seed), "intersecting")
            scores = reward([resting, floating, sunk], prompt)
            wins += [bool(scores[0] > scores[1]), bool(scores[0] > scores[2])]
    assert np.mean(wins) >= 0.75, wins
