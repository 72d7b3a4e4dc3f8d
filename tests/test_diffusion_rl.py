"""Online RL for diffusion on the trainer: Flow-GRPO / DDPO and DiffusionNFT on tiny real pipelines,
user prompt files, exact resume (with EMA and NFT's old policy), HTTP rewards, video models."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mmalign
from mmalign.config import ConfigError, load_config
from mmalign.models.diffusion import load_pipeline
from mmalign.rewards import load_reward
from mmalign.rewards.server import build_app, serving

ROOT = Path(__file__).resolve().parents[1]
FLOW_GRPO = ROOT / "configs/image/flow_grpo.yaml"
NFT = ROOT / "configs/image/diffusion_nft.yaml"


def _overrides(model: Path, out: Path, steps: int, section: str, *extra: str, clip: Path | None = None) -> list[str]:
    reward_args = [f"{section}.reward_args={{path: {clip}}}", f"eval.reward_args={{clip-score: {{path: {clip}}}}}"]
    return [
        f"model.path={model}",
        "model.lora_rank=4",
        f"output_dir={out}",
        f"train.max_steps={steps}",
        "train.batch_size=2",
        "train.checkpoint_every=2",
        "train.log_every=1",
        "train.learning_rate=1e-2",
        "eval.every=0",
        "eval.num_prompts=4",
        "eval.num_steps=3",
        "eval.monitor.action=off",
        f"{section}.group_size=2",
        f"{section}.num_steps=3",
        *(reward_args if clip else []),
        *extra,
    ]


def _trainable(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step-{step:06d}" / "trainable.safetensors"))


def _resumes_exactly(recipe: Path, overrides, tmp_path: Path) -> dict:
    """Run 4 steps straight, and 4 steps with the last checkpoint and result removed (resumed from step
    2): the two end with identical trainable state (weights and moving averages). Returns the first report."""
    straight = mmalign.train(load_config(recipe, overrides(tmp_path / "a")))
    b = tmp_path / "b"
    mmalign.train(load_config(recipe, overrides(b)))
    shutil.rmtree(b / "checkpoints" / "step-000004")
    shutil.rmtree(b / "final")
    mmalign.train(load_config(recipe, overrides(b)))
    first, resumed = _trainable(tmp_path / "a", 4), _trainable(b, 4)
    assert first.keys() == resumed.keys() and all(torch.equal(first[k], resumed[k]) for k in first)
    assert not all(torch.equal(first[k], _trainable(tmp_path / "a", 2)[k]) for k in first)  # it trained
    return straight


def test_flow_grpo_with_ema_trains_resumes_exactly_and_saves_a_loadable_lora(tiny_pipelines, tiny_clip_dir, tmp_path):
    def overrides(out: Path) -> list[str]:
        return _overrides(tiny_pipelines["sd3"], out, 4, "flow_grpo", "flow_grpo.ema=true", "flow_grpo.ema_decay=0.5",
                          "flow_grpo.iterations=2", clip=tiny_clip_dir)  # fmt: skip

    report = _resumes_exactly(FLOW_GRPO, overrides, tmp_path)
    assert {"reward", "frac_reward_zero_std", "kl", "clip_low_frac", "ratio_mean"} <= set(report["train"])
    state = _trainable(tmp_path / "a", 4)
    assert any(k.startswith("ema/") for k in state)
    assert {"reward", "shapes-gold", "clip-score"} <= set(report["metrics"]["after"])
    # the saved adapter is the EMA, and diffusers loads it
    pipe = load_pipeline(tiny_pipelines["sd3"])
    pipe.load_lora_weights(tmp_path / "a" / "final" / "lora")
    ema = {k.removeprefix("ema/"): v for k, v in state.items() if k.startswith("ema/")}
    name = next(k for k in ema if "lora_A" in k)
    loaded = dict(pipe.transformer.named_parameters())[name.replace(".default.", ".default_0.")]
    torch.testing.assert_close(loaded.detach(), ema[name])


def test_first_update_of_each_rollout_has_ratio_exactly_one(tiny_pipelines, tiny_clip_dir, tmp_path):
    run = load_config(FLOW_GRPO, _overrides(tiny_pipelines["sd3"], tmp_path / "r", 2, "flow_grpo", "flow_grpo.beta=0",
                                             clip=tiny_clip_dir))  # fmt: skip
    report = mmalign.train(run)
    history = json.loads((tmp_path / "r" / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    for entry in history["train_log"]:
        assert entry["ratio_mean"] == 1.0
        assert entry["logp_sampling_gap"] < 1e-4  # the training layout recomputes the sampled log-prob
    assert report["steps"] == 2


def test_ddpo_on_an_epsilon_model_with_a_random_window_and_user_prompts(tiny_pipelines, tiny_clip_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["a red circle", "two blue squares"]))
    eval_prompts = tmp_path / "heldout.txt"
    eval_prompts.write_text("a green triangle\na red square\n")
    run = load_config(
        FLOW_GRPO,
        _overrides(tiny_pipelines["sd"], tmp_path / "d", 2, "flow_grpo", "flow_grpo.kernel=ddim",
                   "flow_grpo.noise_level=1.0", "flow_grpo.window=random", "flow_grpo.window_size=2",
                   f"data.prompts={prompts}", f"eval.prompts={eval_prompts}", "eval.gold=null",
                   clip=tiny_clip_dir),
    )  # fmt: skip
    report = mmalign.train(run)
    assert report["gold_metric"] == "clip-score"
    assert report["data"]["num_prompts"] == 2
    assert (tmp_path / "d" / "final" / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_diffusion_nft_resumes_exactly_with_its_old_policy(tiny_pipelines, tiny_clip_dir, tmp_path):
    def overrides(out: Path) -> list[str]:
        return _overrides(tiny_pipelines["sd3"], out, 4, "diffusion_nft", "diffusion_nft.old_decay_rate=0.2",
                          clip=tiny_clip_dir)  # fmt: skip

    report = _resumes_exactly(NFT, overrides, tmp_path)
    state = _trainable(tmp_path / "a", 4)
    old = {k.removeprefix("old/"): v for k, v in state.items() if k.startswith("old/")}
    trained = {k: v for k, v in state.items() if "/" not in k}
    assert old.keys() == trained.keys()
    assert not all(torch.equal(old[k], trained[k]) for k in old)  # the old policy lags behind
    assert {"positive_mse", "negative_mse", "old_decay"} <= set(report["train"])


def test_flow_grpo_on_a_video_model_shares_each_groups_initial_noise(tiny_video_pipelines, tmp_path, monkeypatch):
    from mmalign.models.diffusion import DiffusionModel

    rollouts, real = [], DiffusionModel.sample_trajectory

    def recorded(*args, **kwargs):
        rollouts.append(real(*args, **kwargs))
        return rollouts[-1]

    monkeypatch.setattr(DiffusionModel, "sample_trajectory", recorded)
    run = load_config(
        ROOT / "configs/video/flow_grpo.yaml",
        _overrides(tiny_video_pipelines["wan"], tmp_path / "v", 1, "flow_grpo", "data.resolution=[16,16]",
                   "data.num_frames=5", "eval.num_prompts=2", "flow_grpo.shared_initial_noise=true"),
    )  # fmt: skip
    report = mmalign.train(run)
    assert report["gold_metric"] == "balls-physics"
    assert (tmp_path / "v" / "samples" / "step-000001.gif").is_file()
    (trajectory,) = rollouts  # 2 prompts × group_size 2
    start, final = trajectory.latents[:, 0], trajectory.latents[:, -1]
    assert torch.equal(start[0], start[1]) and torch.equal(start[2], start[3]) and not torch.equal(start[0], start[2])
    assert not torch.equal(final[0], final[1])  # the stochastic steps tell a group's samples apart


def test_rewards_from_an_http_server_and_per_reward_normalisation(tiny_pipelines, tiny_clip_dir, tmp_path):
    clip = load_reward("clip-score", path=str(tiny_clip_dir))
    with serving(build_app(clip, "clip-score", max_batch=64, max_wait_ms=10)) as base:
        spec = f"{{'{base}/clip-score': 1.0, shapes-gold: 0.5}}"
        run = load_config(
            FLOW_GRPO,
            _overrides(tiny_pipelines["sd3"], tmp_path / "h", 1, "flow_grpo", f"flow_grpo.rewards={spec}",
                       "flow_grpo.per_reward_normalisation=true",
                       f"eval.reward_args={{clip-score: {{path: {tiny_clip_dir}}}}}"),
        )  # fmt: skip
        report = mmalign.train(run)
    assert {"reward/shapes-gold", f"reward/{base}/clip-score"} <= set(report["train"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("flow_grpo.kernel=euler", "flow_grpo.kernel"),
        ("flow_grpo.group_size=1", "flow_grpo.group_size"),
        ("flow_grpo.window=random", "flow_grpo.window_size"),
        ("flow_grpo.rewards=[a, b]", "flow_grpo.rewards"),
        ("flow_grpo.noise_level=0", "flow_grpo.noise_level"),
    ],
)
def test_bad_options_name_their_key(override, message):
    extra = ["flow_grpo.window_size=20"] if "window=" in override else []
    with pytest.raises(ConfigError, match=message):
        load_config(FLOW_GRPO, [override, *extra])


def test_a_kernel_that_does_not_fit_the_model_is_a_config_error(tiny_pipelines, tmp_path):
    run = load_config(FLOW_GRPO, _overrides(tiny_pipelines["sd"], tmp_path / "k", 1, "flow_grpo"))
    with pytest.raises(ConfigError, match="flow_grpo.kernel.*ddim"):
        mmalign.train(run)
