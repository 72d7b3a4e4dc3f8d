"""FLUX.1 (dev and schnell), Qwen-Image, SD3.5 and HunyuanVideo through `DiffusionModel`, loaded with
`from_pretrained` from tiny pipelines saved with `save_pretrained`: sampling gives what the diffusers
pipeline gives from the same start latents, an online-RL step recomputes the rollout's log-probabilities
with gradients, and a Flow-GRPO run on FLUX.1 trains and saves a LoRA diffusers loads. (The DPO step and
the LoRA round trip of these families are in test_diffusion_model.py, test_video_core.py and
test_lora_roundtrip.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mmalign
from mmalign.config import ConfigError, load_config
from mmalign.models.diffusion import DiffusionModel, load_pipeline
from mmalign.models.families import pack_latents, unpack_latents
from mmalign.models.lora import load_lora

FAMILIES = ["flux", "flux-schnell", "qwen-image", "sd3.5", "hunyuan-video"]
PROMPTS = ["a red circle", "a blue square above a green circle"]
RESOLUTION = (32, 32)
FRAMES = 5  # pixel frames of the video families' clips
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def paths(tiny_pipelines, tiny_mmdit_pipelines, tiny_video_pipelines) -> dict[str, Path]:
    return {**tiny_pipelines, **tiny_mmdit_pipelines, **tiny_video_pipelines}


def _frames(family: str) -> dict:
    return {"num_frames": FRAMES} if family == "hunyuan-video" else {}


def _pipeline_call(pipe, family: str, noise: torch.Tensor, guidance: float, steps: int, output_type: str):
    """The diffusers pipeline sampling `PROMPTS` from `noise (B, C, [F,] h, w)` with the guidance the
    wrapper's `guidance_scale` means for `family`: latents like `noise`, or pixels in [0, 1] `(B, 3, [T,] H, W)`."""
    packed = family in ("flux", "flux-schnell", "qwen-image")
    kwargs = dict(num_inference_steps=steps, height=RESOLUTION[0], width=RESOLUTION[1], output_type=output_type)
    kwargs["latents"] = pack_latents(noise) if packed else noise
    if family == "flux":  # the guidance value goes into the transformer: no negative pass
        kwargs.update(guidance_scale=guidance, max_sequence_length=pipe.tokenizer_2.model_max_length)
    elif family == "flux-schnell":
        kwargs.update(
            true_cfg_scale=guidance, negative_prompt="", max_sequence_length=pipe.tokenizer_2.model_max_length
        )
    elif family == "qwen-image":
        kwargs.update(true_cfg_scale=guidance, negative_prompt="")
    elif family == "hunyuan-video":  # guidance-distilled too; its prompts follow a 95-token system prompt
        kwargs.update(
            guidance_scale=guidance, num_frames=FRAMES, max_sequence_length=pipe.tokenizer.model_max_length - 95
        )
        out = pipe(PROMPTS, **kwargs).frames
        return out if output_type == "latent" else out.permute(0, 2, 1, 3, 4)  # (B, T, 3, H, W) → (B, 3, T, H, W)
    else:
        kwargs.update(guidance_scale=guidance, max_sequence_length=pipe.tokenizer_3.model_max_length)
    out = pipe(PROMPTS, **kwargs).images
    return unpack_latents(out, *noise.shape[2:]) if packed and output_type == "latent" else out


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_is_the_diffusers_pipelines(family, paths):
    model = DiffusionModel.from_pretrained(paths[family], lora_rank=4)
    pipe = load_pipeline(paths[family])
    noise = torch.randn(
        model.latent_shape(2, RESOLUTION, **_frames(family)), generator=torch.Generator().manual_seed(0)
    )
    latents = model.sample(PROMPTS, num_steps=3, guidance_scale=4.0, noise=noise, resolution=RESOLUTION,
                           **_frames(family))  # fmt: skip
    expected = _pipeline_call(pipe, family, noise, 4.0, 3, "latent")
    assert (latents - noise).abs().mean() > 0.1  # it denoised
    torch.testing.assert_close(latents, expected, rtol=1e-4, atol=1e-4)
    images = _pipeline_call(pipe, family, noise, 4.0, 3, "pt")
    torch.testing.assert_close(model.decode_latents(latents), images, rtol=1e-4, atol=1e-4)
    # the autoencoder round trip lands on the latent layout the denoiser reads
    assert model.encode_images(images * 2 - 1).shape == latents.shape


@pytest.mark.parametrize("family", ["flux", "qwen-image", "sd3.5", "hunyuan-video"])
def test_an_online_rl_step_recomputes_the_rollout_with_gradients(family, paths):
    model = DiffusionModel.from_pretrained(paths[family], lora_rank=4)
    guidance = 3.5 if model.embeds_guidance else 1.0
    traj = model.sample_trajectory(PROMPTS, kernel="sde", noise_level=0.7, num_steps=3, guidance_scale=guidance,
                                   generator=torch.Generator().manual_seed(0), resolution=RESOLUTION,
                                   **_frames(family))  # fmt: skip
    assert traj.latents.shape == (2, 4, *model.latent_shape(2, RESOLUTION, **_frames(family))[1:])
    assert traj.log_probs.shape == (2, 3)
    if model.embeds_guidance:  # the rollout's guidance rides in the conditioning the transition reuses
        assert traj.negative is None and torch.equal(traj.cond.guidance, torch.full((2,), guidance))
    total = 0
    for w, step in enumerate(traj.window):
        x, x_next = traj.step_pair(w)
        log_prob, _, _ = model.transition(x, x_next, step, traj.grid, traj.cond, traj.negative, guidance)
        torch.testing.assert_close(log_prob.detach(), traj.log_probs[:, w], rtol=1e-4, atol=1e-4)
        total = total + log_prob.mean()
    total.backward()
    grads = [p.grad for p in model.trainable_parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def test_flux_dev_reads_the_embedded_guidance_and_refuses_it_elsewhere(paths, tmp_path):
    dev = DiffusionModel.from_pretrained(paths["flux"], lora_rank=4, embedded_guidance=2.0)
    cond = dev.encode_prompt(PROMPTS, RESOLUTION)
    assert torch.equal(cond.guidance, torch.full((2,), 2.0))
    x = torch.randn(dev.latent_shape(2, RESOLUTION), generator=torch.Generator().manual_seed(0))
    t = torch.full((2,), 500.0)
    with torch.no_grad():
        sampling, negative = dev.guidance_conditioning(PROMPTS, RESOLUTION, 6.0)  # no negative pass
        assert negative is None and torch.equal(sampling.guidance, torch.full((2,), 6.0))
        other = dev.predict(x, t, sampling)
        assert (dev.predict(x, t, cond) - other).abs().max() > 1e-4
    with pytest.raises(ValueError, match="guidance-distilled"):
        DiffusionModel.from_pretrained(paths["flux-schnell"], lora_rank=4, embedded_guidance=2.0)
    overrides = [f"model.path={paths['sd3.5']}", "model.embedded_guidance=2", f"output_dir={tmp_path}"]
    run = load_config(ROOT / "configs/image/flow_grpo.yaml", overrides)
    with pytest.raises(ConfigError, match="model.embedded_guidance.*StableDiffusion3Pipeline"):
        mmalign.train(run)


def test_flow_grpo_trains_flux_and_diffusers_loads_the_lora(paths, tmp_path):
    run = load_config(
        ROOT / "configs/image/flow_grpo.yaml",
        [f"model.path={paths['flux']}", "model.lora_rank=4", f"output_dir={tmp_path / 'run'}", "train.max_steps=1",
         "train.batch_size=2", "train.learning_rate=1e-2", "train.threads=1", "data.resolution=[32,32]",
         "eval.every=0", "eval.num_prompts=2", "eval.num_steps=2", "eval.monitor.action=off",
         "eval.rewards=[]", "flow_grpo.rewards=jpeg-compressibility", "flow_grpo.group_size=2", "flow_grpo.num_steps=2",
         "flow_grpo.guidance_scale=3.5"],
    )  # fmt: skip
    report = mmalign.train(run)
    assert report["steps"] == 1 and "reward" in report["train"]
    pipe = load_pipeline(paths["flux"])
    load_lora(pipe, tmp_path / "run" / "final" / "lora")
    assert any("lora_A" in name for name, _ in pipe.transformer.named_parameters())


def test_resolution_shifted_schedules_train_without_a_fixed_shift(paths):
    flux = DiffusionModel.from_pretrained(paths["flux"], lora_rank=4)
    assert flux.pipe.scheduler.config.shift == 3.0 and flux.pipe.scheduler.config.use_dynamic_shifting
    assert flux.noise.shift == 1.0  # the config's shift is unused at inference too: the grid shifts by resolution
    small, large = (flux.sampling_grid("sde", 0.5, 4, flux.latent_shape(1, size)) for size in [(32, 32), (256, 256)])
    assert (large.sigmas[1:-1] > small.sigmas[1:-1]).all()  # more image tokens, more noise at each step
    assert DiffusionModel.from_pretrained(paths["sd3.5"], lora_rank=4).noise.shift == 3.0  # a fixed shift stays
