"""Wan 2.2 A14B's two experts (`transformer` above the boundary timestep, `transformer_2` below) as one
denoiser: sampling as `WanPipeline` samples (with its `guidance_scale_2` on the low-noise expert), a DPO
step and an online-RL step that train both experts, and the adapters of both loaded back by diffusers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import mmalign
from mmalign.config import ConfigError, load_config
from mmalign.losses import diffusion_dpo_loss, per_sample_mse
from mmalign.models.diffusion import DiffusionModel, load_pipeline
from mmalign.models.lora import EXPERT_LORA_FILE, LORA_FILE, LoraLoadError, load_lora

ROOT = Path(__file__).resolve().parents[1]
RESOLUTION, FRAMES = (32, 32), 5
PROMPTS = ["a red ball bounces twice", "a small blue ball falls"]


@pytest.fixture
def model(tiny_video_pipelines) -> DiffusionModel:
    return DiffusionModel.from_pretrained(tiny_video_pipelines["wan2.2"], lora_rank=4)


def _expert_grads(model: DiffusionModel) -> dict[str, bool]:
    """Per expert: whether its adapter received a gradient (LoRA B: A's is zero while B starts at zero)."""
    named = [(n, p) for n, p in model.base_denoiser.named_parameters() if p.requires_grad]
    return {
        expert: any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in named if n.split(".")[0] == expert)
        for expert in ("transformer", "transformer_2")
    }


def test_two_experts_sample_as_the_wan_pipeline(model, tiny_video_pipelines):
    pipe = load_pipeline(tiny_video_pipelines["wan2.2"])
    assert model.experts.boundary == 875.0
    grid = model.sampling_grid("sde", 0.0, 4, model.latent_shape(1, RESOLUTION, FRAMES))
    assert (grid.timesteps >= 875).any() and (grid.timesteps < 875).any()  # both experts denoise
    noise = torch.randn(model.latent_shape(2, RESOLUTION, FRAMES), generator=torch.Generator().manual_seed(0))
    latents = model.sample(PROMPTS, num_steps=4, guidance_scale=4.0, noise=noise, resolution=RESOLUTION,
                           num_frames=FRAMES)  # fmt: skip
    expected = pipe(PROMPTS, num_inference_steps=4, guidance_scale=4.0, latents=noise, height=RESOLUTION[0],
                    width=RESOLUTION[1], num_frames=FRAMES, max_sequence_length=pipe.tokenizer.model_max_length,
                    output_type="latent").frames  # fmt: skip
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-4)


def test_guidance_scale_2_guides_the_low_noise_expert_as_the_wan_pipeline(model, tiny_video_pipelines):
    pipe = load_pipeline(tiny_video_pipelines["wan2.2"])
    noise = torch.randn(model.latent_shape(2, RESOLUTION, FRAMES), generator=torch.Generator().manual_seed(0))
    for g, g2 in ((4.0, 1.5), (2.0, 6.0)):
        latents = model.sample(PROMPTS, num_steps=4, guidance_scale=g, guidance_scale_2=g2, noise=noise,
                               resolution=RESOLUTION, num_frames=FRAMES)  # fmt: skip
        expected = pipe(PROMPTS, num_inference_steps=4, guidance_scale=g, guidance_scale_2=g2, latents=noise,
                        height=RESOLUTION[0], width=RESOLUTION[1], num_frames=FRAMES,
                        max_sequence_length=pipe.tokenizer.model_max_length, output_type="latent").frames  # fmt: skip
        torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-4)


def test_guidance_scale_2_changes_the_low_noise_steps_only(model):
    noise = torch.randn(model.latent_shape(2, RESOLUTION, FRAMES), generator=torch.Generator().manual_seed(0))

    def latents(g2: float | None) -> tuple[torch.Tensor, torch.Tensor]:  # every step's latents (B, T+1, …), Euler
        traj = model.sample_trajectory(PROMPTS, kernel="sde", noise_level=0.0, num_steps=4, guidance_scale=4.0,
                                       guidance_scale_2=g2, noise=noise, resolution=RESOLUTION,
                                       num_frames=FRAMES)  # fmt: skip
        return traj.latents, traj.grid.timesteps

    same, timesteps = latents(None)
    high = int((timesteps >= model.experts.boundary).sum())  # the first `high` steps run on `transformer`
    assert 0 < high < len(timesteps)
    assert torch.equal(latents(4.0)[0], same)  # unset: the first scale, as WanPipeline defaults it
    other = latents(1.5)[0]
    assert torch.equal(other[:, : high + 1], same[:, : high + 1])  # the high-noise steps are untouched
    assert (other[:, high + 1] - same[:, high + 1]).abs().max() > 1e-3  # the first low-noise step is not


def test_a_batched_transition_guides_each_row_by_its_own_expert(model):
    traj = model.sample_trajectory(PROMPTS, kernel="sde", noise_level=0.7, num_steps=4, guidance_scale=4.0,
                                   guidance_scale_2=1.5, resolution=RESOLUTION, num_frames=FRAMES,
                                   generator=torch.Generator().manual_seed(0))  # fmt: skip
    window = torch.tensor(traj.window)
    n, w = traj.latents.shape[0], len(window)
    # Flow-GRPO's layout: every window step of every sample in one call, high- and low-noise rows mixed
    x, x_next = traj.latents[:, window].flatten(0, 1), traj.latents[:, window + 1].flatten(0, 1)
    args = (x, x_next, window.repeat(n), traj.grid, traj.cond.repeat(w), traj.negative.repeat(w), traj.guidance_scale)
    with torch.no_grad():
        logp, mean, _ = model.transition(*args, traj.guidance_scale_2)
        _, one_scale, _ = model.transition(*args)  # every row at guidance_scale
    torch.testing.assert_close(logp.view(n, w), traj.log_probs, rtol=1e-4, atol=1e-4)
    low = (traj.grid.timesteps[window] < model.experts.boundary).repeat(n)
    assert low.any() and not low.all()
    torch.testing.assert_close(one_scale[~low], mean[~low], rtol=1e-5, atol=1e-5)
    assert (one_scale[low] - mean[low]).flatten(1).abs().amax(1).min() > 1e-3  # every low-noise row moved


@pytest.mark.parametrize(
    ("recipe", "method_options"),
    [
        ("flow_grpo", ("flow_grpo.group_size=2", "flow_grpo.num_steps=3")),
        ("image/diffusion_nft", ("diffusion_nft.group_size=2", "diffusion_nft.num_steps=3", "eval.gold=balls-physics",
                                 "eval.rewards=[]", "diffusion_nft.rewards=motion-smoothness")),
        ("densedpo", ("densedpo.num_videos=2", "densedpo.build_batch=2", "densedpo.sample_steps=3",
                      "densedpo.labeler_args={threshold: 0.001}", "densedpo.tie_margin=0")),
        ("rdpo", ("rdpo.num_videos=1", "rdpo.sample_steps=3", "rdpo.positive_depths=[0.5]", "rdpo.candidates=1",
                  "rdpo.noising=inversion", "rdpo.inversion_steps=1")),
    ],
    ids=["flow-grpo", "diffusion-nft", "densedpo", "rdpo"],
)  # fmt: skip
def test_every_sampling_of_a_run_reads_its_guidance_scale_2(recipe, method_options, tiny_video_pipelines, tmp_path,
                                                            monkeypatch):  # fmt: skip
    folder, section = recipe.split("/") if "/" in recipe else ("video", recipe)
    seen = set()
    scale_at = DiffusionModel.guidance_scale_at

    def recording(self, t, guidance_scale, guidance_scale_2=None):
        seen.add((guidance_scale, guidance_scale_2))
        return scale_at(self, t, guidance_scale, guidance_scale_2)

    monkeypatch.setattr(DiffusionModel, "guidance_scale_at", recording)
    overrides = [
        f"model.path={tiny_video_pipelines['wan2.2']}", f"output_dir={tmp_path}", "model.lora_rank=4",
        "train.max_steps=1", "train.batch_size=1", "train.threads=1", "train.checkpoint_every=0", "eval.every=0",
        "eval.num_prompts=1", "eval.samples_per_prompt=1", "eval.num_steps=3", "eval.guidance_scale=3",
        "eval.guidance_scale_2=5", f"{section}.guidance_scale=2", f"{section}.guidance_scale_2=1.5", *method_options,
    ]  # fmt: skip
    mmalign.train(load_config(ROOT / "configs" / folder / f"{section}.yaml", overrides))
    # rollouts (and Flow-GRPO's recomputed steps) or pair building (with RDPO's inversion), then evaluation
    assert seen == {(2.0, 1.5), (3.0, 5.0)}


def test_guidance_scale_2_is_refused_on_a_model_with_one_denoiser(tiny_video_pipelines, tmp_path):
    path = tiny_video_pipelines["wan"]
    wan = DiffusionModel.from_pretrained(path, lora_rank=None, reference=False)
    with pytest.raises(ValueError, match="guidance_scale_2 guides the low-noise expert.*WanPipeline has one denoiser"):
        wan.sample(PROMPTS, num_steps=1, guidance_scale_2=2.0, resolution=RESOLUTION, num_frames=FRAMES)
    for recipe, key in (("flow_grpo", "eval"), ("flow_grpo", "flow_grpo"), ("rdpo", "rdpo")):
        overrides = [f"model.path={path}", f"{key}.guidance_scale_2=2", f"output_dir={tmp_path / key}"]
        run = load_config(ROOT / f"configs/video/{recipe}.yaml", overrides)
        with pytest.raises(ConfigError, match=rf"^config key '{key}.guidance_scale_2' .*WanPipeline has one denoiser"):
            mmalign.train(run)  # refused once the model is loaded, before any pair or rollout is made
    with pytest.raises(ConfigError, match="flow_grpo.guidance_scale_2' must be ≥ 1"):
        load_config(ROOT / "configs/video/flow_grpo.yaml", ["flow_grpo.guidance_scale_2=0.5"])


def test_a_dpo_step_routes_each_pair_to_its_expert_and_trains_both(model):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, *model.latent_shape(1, RESOLUTION, FRAMES)[1:], generator=g)  # 2 winners, 2 losers
    noise = torch.randn(x0.shape, generator=g)
    t = torch.tensor([950.0, 300.0]).repeat(2)  # pair 1 on the high-noise expert, pair 2 on the low-noise one
    cond = model.encode_prompt(PROMPTS, RESOLUTION).tile(2)
    x_t, target = model.noise.add_noise(x0, noise, t), model.noise.target(x0, noise, t)
    prediction = model.predict(x_t, t, cond)
    err = per_sample_mse(prediction, target)
    ref = per_sample_mse(model.predict_reference(x_t, t, cond), target)
    loss, _ = diffusion_dpo_loss(err[:2], err[2:], ref[:2], ref[2:], beta=100.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)  # LoRA B starts at zero: policy = reference
    loss.backward()
    assert _expert_grads(model) == {"transformer": True, "transformer_2": True}
    with torch.no_grad():  # a mixed batch is each row on its own expert
        rows = torch.cat([model.predict(x_t[i : i + 1], t[i : i + 1], cond[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(rows, prediction.detach(), rtol=1e-5, atol=1e-6)


def test_an_online_rl_step_trains_both_experts(model):
    traj = model.sample_trajectory(PROMPTS, kernel="sde", noise_level=0.7, num_steps=4, resolution=RESOLUTION,
                                   num_frames=FRAMES, generator=torch.Generator().manual_seed(0))  # fmt: skip
    total = 0
    for w, step in enumerate(traj.window):
        x, x_next = traj.step_pair(w)
        log_prob, _, _ = model.transition(x, x_next, step, traj.grid, traj.cond)
        torch.testing.assert_close(log_prob.detach(), traj.log_probs[:, w], rtol=1e-4, atol=1e-4)
        total = total + log_prob.mean()
    total.backward()
    assert _expert_grads(model) == {"transformer": True, "transformer_2": True}


def test_both_adapters_load_into_diffusers_and_merge(model, tiny_video_pipelines, tmp_path):
    path = tiny_video_pipelines["wan2.2"]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a trained adapter on both experts
        for p in model.trainable_parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    x = torch.randn(2, *model.latent_shape(1, RESOLUTION, FRAMES)[1:], generator=g)
    t = torch.tensor([950.0, 300.0])
    cond = model.encode_prompt(PROMPTS, RESOLUTION)
    with torch.no_grad():
        trained = model.predict(x, t, cond)
        assert (trained - model.predict_reference(x, t, cond)).abs().max() > 1e-3

    model.save_lora(tmp_path / "lora")
    assert {p.name for p in (tmp_path / "lora").iterdir()} == {LORA_FILE, EXPERT_LORA_FILE}
    pipe = load_pipeline(path)
    load_lora(pipe, tmp_path / "lora")  # pipe.load_lora_weights, then again with load_into_transformer_2
    loaded = DiffusionModel(pipe, lora_rank=None, reference=False)
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict(x, t, cond), trained, rtol=1e-4, atol=1e-5)
    with pytest.raises(LoraLoadError, match="no transformer_2"):
        load_lora(load_pipeline(tiny_video_pipelines["wan"]), tmp_path / "lora")

    model.save_pretrained(tmp_path / "merged")
    merged = DiffusionModel.from_pretrained(tmp_path / "merged", lora_rank=None, reference=False)
    with torch.no_grad():
        torch.testing.assert_close(merged.predict(x, t, cond), trained, rtol=1e-4, atol=1e-5)


def test_a_step_on_one_expert_still_gives_the_other_a_gradient_for_data_parallel_reduction(model):
    x = torch.randn(2, *model.latent_shape(1, RESOLUTION, FRAMES)[1:], generator=torch.Generator().manual_seed(0))
    cond = model.encode_prompt(PROMPTS, RESOLUTION)
    model.predict(x, torch.tensor([950.0, 990.0]), cond).pow(2).mean().backward()
    low = [p for n, p in model.base_denoiser.named_parameters() if p.requires_grad and n.startswith("transformer_2.")]
    assert low and all(p.grad is not None and not p.grad.any() for p in low)  # in the graph, with gradient 0
