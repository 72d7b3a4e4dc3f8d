"""GAN-RM: the loss, bootstrapping bookkeeping, training on a separable toy, saving and scoring."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from mmalign.data import shapes_world
from mmalign.errors import UserInputError
from mmalign.image.gan_rm import GanRM, GanRMConfig, bootstrap_targets, train_gan_rm
from mmalign.losses import class_balance_weights, weighted_soft_bce
from mmalign.rewards import load_reward
from mmalign.rewards.metrics import roc_auc


def test_soft_bce_is_minimal_at_the_target():
    for y in (0.0, 0.3, 0.9, 1.0):
        target = torch.tensor([y])
        grid = torch.linspace(-6, 6, 2001, dtype=torch.float64)
        losses = [weighted_soft_bce(g.view(1), target.double(), torch.ones(1, dtype=torch.float64)) for g in grid]
        best = torch.sigmoid(grid[int(torch.stack(losses).argmin())]).item()
        if 0 < y < 1:
            assert best == pytest.approx(y, abs=2e-3)
            logit = torch.tensor([math.log(y / (1 - y))], requires_grad=True)
            weighted_soft_bce(logit, target, torch.ones(1)).backward()
            assert abs(logit.grad.item()) < 1e-6
        else:
            assert best == pytest.approx(y, abs=5e-3)


def test_soft_bce_matches_a_hand_computation_and_balances_classes():
    logits, y = torch.tensor([0.5, -1.0, 2.0]), torch.tensor([1.0, 0.0, 0.25])
    groups = torch.tensor([0, 1, 1])
    w = class_balance_weights(groups)
    assert torch.allclose(w, torch.tensor([0.5, 0.25, 0.25]))
    manual = [
        -(t * math.log(1 / (1 + math.exp(-v))) + (1 - t) * math.log(1 - 1 / (1 + math.exp(-v))))
        for v, t in zip(logits.tolist(), y.tolist())
    ]
    expected = sum(wi * m for wi, m in zip(w.tolist(), manual)) / w.sum().item()
    assert weighted_soft_bce(logits, y, w).item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="targets"):
        weighted_soft_bce(logits, torch.tensor([1.5, 0.0, 0.0]), w)


def test_bootstrap_sets_are_disjoint_sorted_and_soft():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7, 0.2, 0.3, 0.8])
    top, labels, bottom = bootstrap_targets(scores, top=3, alpha=0.5)
    assert top.tolist() == [1, 6, 3] and sorted(bottom.tolist()) == [0, 4, 5]
    assert set(top.tolist()).isdisjoint(bottom.tolist())
    assert labels[0] == 1 and (labels[1:] < labels[:-1]).all() and (labels > 0).all() and (labels <= 1).all()
    top, labels, bottom = bootstrap_targets(scores, top=100, alpha=0.01)  # capped at half the pool
    assert len(top) == len(bottom) == 3 and set(top.tolist()).isdisjoint(bottom.tolist())


def test_auc():
    assert roc_auc(torch.tensor([2.0, 3.0]), torch.tensor([0.0, 1.0])) == 1.0
    assert roc_auc(torch.tensor([0.0]), torch.tensor([0.0])) == 0.5


def _renders(n: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    images = [shapes_world.render(c, rng) for c in shapes_world.sample_captions(n, "train", rng)]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255


def _blurred(images: torch.Tensor) -> torch.Tensor:
    """Stand-in for a weak generator's outputs: blurred, washed-out renders."""
    blurred = torch.nn.functional.avg_pool2d(images, 5, stride=1, padding=2, count_include_pad=False)
    return 0.6 * blurred + 0.4 * blurred.mean(dim=(1, 2, 3), keepdim=True)


def _folder(images: torch.Tensor, folder) -> str:
    from mmalign.image.gan_rm import save_image_folder

    save_image_folder(images, folder)
    return str(folder)


def test_train_separates_targets_from_generated_and_saves_a_reward(tmp_path):
    targets, generated = _folder(_renders(120, 0), tmp_path / "t"), _folder(_blurred(_renders(120, 1)), tmp_path / "g")
    config = GanRMConfig(hidden=64, bootstrap_top=20)
    pool = _folder(_blurred(_renders(60, 2)), tmp_path / "pool")
    model = train_gan_rm(targets, generated, tmp_path / "rm", config, pool=pool)
    assert model.metrics["heldout_auc"] > 0.95 and model.metrics["bootstrap"] == {"pool": 60, "top": 20, "bottom": 20}
    report = json.loads((tmp_path / "rm" / "report.json").read_text())  # a Trainer run: report, logs, checkpoint
    assert report["gold_metric"] == "heldout_auc" and report["after"] == model.metrics["heldout_auc"]
    assert (tmp_path / "rm" / "init" / "final" / "reward").is_dir() and (tmp_path / "rm" / "logs").is_dir()
    fresh_targets, fresh_generated = _renders(30, 3), _blurred(_renders(30, 4))
    folder = str(tmp_path / "rm" / "final" / "reward")
    reloaded = load_reward(folder)
    assert isinstance(reloaded, GanRM)
    assert roc_auc(reloaded(fresh_targets), reloaded(fresh_generated)) > 0.95
    assert torch.allclose(load_reward("gan-rm", path=folder)(fresh_targets), reloaded(fresh_targets))
    # frames of a clip are pooled: a clip of target frames outscores a clip of generated frames
    clips = torch.stack([fresh_targets[:4], fresh_generated[:4]])
    video = reloaded.score_video(clips)
    assert video[0] > video[1]
    assert not any(p.requires_grad for p in reloaded.encoder.backend.model.parameters())


def test_the_cli_trains_a_gan_rm_on_folders_of_the_users_images(tmp_path, capsys):
    from mmalign.cli import main

    targets, generated = (
        _folder(_renders(60, 5), tmp_path / "ppd"),
        _folder(_blurred(_renders(60, 6)), tmp_path / "own"),
    )
    (tmp_path / "rm.yaml").write_text(
        "method: gan-rm-reward\ntrain: {max_steps: 60, batch_size: 32, learning_rate: 1.0e-3, checkpoint_every: 30}\n"
        "gan_rm_reward: {hidden: 32}\n"
    )
    out = tmp_path / "run"
    args = ["train", str(tmp_path / "rm.yaml"), f"data={targets}", f"data.generated={generated}", f"output_dir={out}"]
    assert main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["data"] == {"path": targets} and report["gold_metric"] == "heldout_auc" and report["after"] > 0.9
    assert f"from `{generated}`" in (out / "report.md").read_text()
    assert isinstance(load_reward(str(out / "final" / "reward")), GanRM)
    assert main([*args, "data.pool=" + generated, f"output_dir={out}-pool"]) == 2  # a pool without bootstrapping
    assert "data.pool and gan_rm_reward.bootstrap_from need" in capsys.readouterr().err


def test_encoder_stays_frozen_during_training(tmp_path):
    from mmalign.rewards.clip_score import ClipScore

    before = {k: v.clone() for k, v in ClipScore().backend.model.state_dict().items()}
    targets, generated = _folder(_renders(12, 0), tmp_path / "t"), _folder(_blurred(_renders(12, 1)), tmp_path / "g")
    after = train_gan_rm(targets, generated, tmp_path / "rm", GanRMConfig(epochs=2, hidden=8)).encoder.backend.model
    after = after.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_too_few_images_is_a_clear_error(tmp_path):
    with pytest.raises(UserInputError, match="at least 2 target"):
        train_gan_rm(_folder(_renders(1, 0), tmp_path / "t"), _folder(_renders(5, 1), tmp_path / "g"), tmp_path / "rm")
    assert not (tmp_path / "rm" / "final").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="targets: .* holds no images"):
        train_gan_rm(tmp_path / "empty", tmp_path / "g", tmp_path / "rm2")
    with pytest.raises(UserInputError, match="not a GAN-RM folder"):
        GanRM(str(tmp_path))


# ------------------------------------------------------------------------------------------- rounds
def _rounds_config(overrides: list[str]):
    from mmalign.config import load_config

    return load_config(None, ["method=gan-rm", "eval.every=0", *overrides])


def _round_overrides(model, out) -> list[str]:
    return [
        f"model={model}",
        f"output_dir={out}",
        "train.max_steps=2",
        "train.batch_size=4",
        "train.checkpoint_every=1",
        "eval.num_prompts=4",
        "eval.num_steps=2",
        "eval.rewards=[]",
        "eval.grid_size=4",
        "gan_rm.num_targets=12",
        "gan_rm.raw_negatives=12",
        "gan_rm.num_prompts=6",
        "gan_rm.num_steps=2",
        "gan_rm.min_margin=0",
        "gan_rm.candidates=3",
        "gan_rm.reward_model.hidden=8",
        "gan_rm.reward_model.epochs=3",
        "data.resolution=32",
    ]


def test_rounds_keep_every_stage_and_reuse_the_targets(tiny_pipelines, tmp_path):
    import mmalign

    out = tmp_path / "run"
    report = mmalign.train(_rounds_config(_round_overrides(tiny_pipelines["sd"], out)))
    assert [r["round"] for r in report["rounds"]] == [1, 2] and report["steps"] == 4
    for k in (1, 2):
        for stage in ("rm/final/reward/mmalign_reward.json", "pairs/pairs.jsonl", "train/report.json",
                      "train/final/pipeline"):  # fmt: skip
            assert (out / f"round-{k}" / stage).exists(), (k, stage)
    # D_r comes from round 1's generator and is reused; round 2's pairs come from round 1's result
    assert (out / "round-1/raw").is_dir() and not (out / "round-2/raw").exists()
    meta2 = json.loads((out / "round-2/pairs/meta.json").read_text())
    assert meta2["generator"] == str(out / "round-1/train/final/pipeline")
    rows = [json.loads(line) for line in (out / "round-2/pairs/pairs.jsonl").read_text().splitlines()]
    assert all(r["score_w"] >= r["score_l"] for r in rows)
    assert report["before"] == json.loads((out / "round-1/train/report.json").read_text())["before"]
    assert (out / "report.md").exists() and (out / "samples/before_after.png").exists()


def test_embedded_targets_depict_the_training_prompts(tiny_pipelines, tmp_path):
    """PPD renders follow the prompts' caption mix, so the RM cannot separate them by content."""
    from mmalign.image.gan_rm_rounds import GanRMRounds

    run = _rounds_config([*_round_overrides(tiny_pipelines["sd"], tmp_path / "run"), "gan_rm.num_targets=40"])
    prompts = ["a red circle", "a blue square left of a green circle"]
    folder = GanRMRounds(run).target_images(prompts)
    files = sorted(folder.glob("*.png"))
    drawn = (folder / "prompts.txt").read_text().splitlines()
    assert len(files) == len(drawn) == 40 and set(drawn) == set(prompts)


def test_rounds_resume_mid_round_exactly_and_refuse_a_changed_config(tiny_pipelines, tmp_path):
    import shutil

    import mmalign
    from mmalign.train.rundir import ConfigMismatchError

    out = tmp_path / "run"
    overrides = [*_round_overrides(tiny_pipelines["sd"], out), "gan_rm.rounds=1"]
    first = mmalign.train(_rounds_config(overrides))
    weights = out / "round-1/train/checkpoints/step-000002/trainable.safetensors"
    trained = weights.read_bytes()
    # a kill during round 1's training: its result, report, last checkpoint and stage record are gone
    rm_before = (out / "round-1/rm/final/reward/head.safetensors").read_bytes()
    for name in ("final", "report.json", "report.md"):
        path = out / "round-1/train" / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    shutil.rmtree(out / "round-1/train/checkpoints/step-000002")
    stages = json.loads((out / "stages.json").read_text())
    assert list(stages) == ["round-1/raw", "round-1/rm", "round-1/pairs", "round-1/train"]
    (out / "stages.json").write_text(json.dumps({k: v for k, v in stages.items() if k != "round-1/train"}))
    (out / "report.json").unlink()
    again = mmalign.train(_rounds_config(overrides))
    assert (out / "round-1/rm/final/reward/head.safetensors").read_bytes() == rm_before  # finished: not redone
    assert weights.read_bytes() == trained  # the resumed training ends with the same weights
    assert again["after"] == pytest.approx(first["after"], abs=1e-6)
    with pytest.raises(ConfigMismatchError, match="different config"):
        mmalign.train(_rounds_config([*overrides, "gan_rm.min_margin=0.001"]))
    fresh = mmalign.train(_rounds_config([*overrides, "gan_rm.min_margin=0.001", "train.resume=false"]))
    assert fresh["rounds"][0]["pairs"] <= first["rounds"][0]["pairs"]


def test_rounds_reject_bad_targets(tiny_pipelines, tmp_path):
    import mmalign

    model = tiny_pipelines["sd"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserInputError, match="holds no images"):
        mmalign.train(_rounds_config([*_round_overrides(model, tmp_path / "a"), f"gan_rm.targets={empty}"]))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserInputError, match="broken.png"):
        mmalign.train(_rounds_config([*_round_overrides(model, tmp_path / "b"), f"gan_rm.targets={bad}"]))
    with pytest.raises(ValueError, match="candidates"):
        mmalign.train(_rounds_config([*_round_overrides(model, tmp_path / "c"), "gan_rm.candidates=1"]))
