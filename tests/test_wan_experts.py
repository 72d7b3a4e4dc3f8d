"""Wan 2.2 A14B's two experts (`transformer` above the boundary timestep, `transformer_2` below) as one
denoiser: sampling as `WanPipeline` samples, a DPO step and an online-RL step that train both experts,
and the adapters of both loaded back by diffusers."""

from __future__ import annotations

import math

import pytest
import torch

from mmalign.losses import diffusion_dpo_loss, per_sample_mse
from mmalign.models.diffusion import DiffusionModel, load_pipeline
from mmalign.models.lora import EXPERT_LORA_FILE, LORA_FILE, LoraLoadError, load_lora

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
