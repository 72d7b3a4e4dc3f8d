"""DiffusionModel on tiny instances of every supported family, loaded through from_pretrained."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate import Accelerator

from mmalign.config import load_config
from mmalign.image.diffusion_dpo import DiffusionDPO
from mmalign.models.diffusion import DiffusionModel, load_pipeline
from mmalign.models.families import Conditioning

FAMILIES = ["sd", "sd-v", "sdxl", "sd3", "sd3.5"]
#: the packed-latent families (tests/test_mmdit_families.py checks their sampling and online RL)
MMDIT = ["flux", "qwen-image"]


def _dpo_method(model_dir, pair_folder, *extra: str) -> DiffusionDPO:
    run = load_config(
        None,
        [
            f"model={model_dir}",
            f"data={pair_folder}",
            "eval.rewards=[]",
            "model.lora_rank=4",
            "diffusion_dpo.beta=5000",
            *extra,
        ],
    )
    method = DiffusionDPO(run)
    method.setup(Accelerator(cpu=True))
    return method


@pytest.mark.parametrize("family", FAMILIES + MMDIT)
def test_one_dpo_step_per_family(family, tiny_pipelines, tiny_mmdit_pipelines, pair_folder):
    method = _dpo_method({**tiny_pipelines, **tiny_mmdit_pipelines}[family], pair_folder, "data.resolution=32")
    assert method.model.family.name == family.removesuffix("-v").removesuffix(".5")
    batch = method.collate([method.dataset[i] for i in range(4)])
    loss, metrics = method.compute_loss(batch, step=0, micro=0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # LoRA B starts at zero: policy == reference
    params = method.model.trainable_parameters()
    assert params and all(p.dtype == torch.float32 for p in params)
    before = [p.detach().clone() for p in params]
    loss.backward()
    assert all(p.grad is not None for p in params)
    norm = torch.sqrt(sum(p.grad.pow(2).sum() for p in params))
    with torch.no_grad():  # a small normalised descent step: first order guarantees a decrease
        for p in params:
            p -= 1e-2 * p.grad / norm
    assert any(not torch.equal(a, p) for a, p in zip(before, params))
    after, metrics = method.compute_loss(batch, step=0, micro=0)  # same keys: same noise and timesteps
    assert after.item() < math.log(2)
    assert metrics["z_mean"].item() > 0


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_loads_with_load_lora_weights_and_reference_is_the_base(family, tiny_pipelines, tmp_path):
    model = DiffusionModel.from_pretrained(tiny_pipelines[family], lora_rank=4)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *model.latent_shape(1, model.default_resolution)[1:], generator=g)
    t = model.noise.sample_timesteps(2, g)
    cond = model.encode_prompt(["a red circle", "a blue square above a green circle"])
    base = DiffusionModel.from_pretrained(tiny_pipelines[family], lora_rank=None, reference=False)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
        trained = model.predict(x, t, cond)
        assert torch.allclose(model.predict_reference(x, t, cond), base.predict(x, t, cond), atol=1e-6)
        assert not torch.allclose(trained, base.predict(x, t, cond), atol=1e-3)
        assert torch.allclose(model.predict(x, t, cond), trained)  # adapters re-enabled after the reference

    model.save_lora(tmp_path / "lora")
    pipe = load_pipeline(tiny_pipelines[family])
    pipe.load_lora_weights(str(tmp_path / "lora"))
    with torch.no_grad():
        loaded = model.family.denoise(getattr(pipe, model.family.denoiser_attr), x, t, cond)
    assert torch.allclose(loaded, trained, atol=1e-5)

    model.save_pretrained(tmp_path / "merged")
    merged = DiffusionModel.from_pretrained(tmp_path / "merged", lora_rank=None, reference=False)
    with torch.no_grad():
        assert torch.allclose(merged.predict(x, t, cond), trained, atol=1e-5)


def test_full_finetune_reference_is_a_frozen_copy(tiny_pipelines):
    model = DiffusionModel.from_pretrained(tiny_pipelines["sd"], lora_rank=None)
    ref_params = list(model.reference_denoiser.parameters())
    assert all(not p.requires_grad for p in ref_params)
    snapshot = [p.clone() for p in ref_params]
    optimizer = torch.optim.SGD(model.trainable_parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([10, 500])
    cond = model.encode_prompt(["a red circle"] * 2)
    for _ in range(3):
        model.predict(x, t, cond).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(snapshot, model.reference_denoiser.parameters()))
    assert not torch.allclose(model.predict(x, t, cond), model.predict_reference(x, t, cond))


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_sampling_from_noise_and_from_a_partly_noised_latent(family, tiny_pipelines):
    model = DiffusionModel.from_pretrained(tiny_pipelines[family], lora_rank=4)
    prompts = ["a red circle", "a blue square"]
    g = torch.Generator().manual_seed(0)
    latents = model.sample(prompts, num_steps=4, generator=g)
    again = model.sample(prompts, num_steps=4, generator=torch.Generator().manual_seed(0))
    assert latents.shape == model.latent_shape(2, model.default_resolution)
    g2 = torch.Generator().manual_seed(0)
    assert torch.equal(latents, model.sample(prompts, num_steps=4, generator=g2)) and torch.equal(latents, again)
    images = model.decode_latents(latents)
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    light = model.sample(prompts, num_steps=10, noise=noise, init_latents=latents, strength=0.1)
    heavy = model.sample(prompts, num_steps=10, noise=noise, init_latents=latents, strength=0.9)
    assert (light - latents).abs().mean() < (heavy - latents).abs().mean()
    with pytest.raises(ValueError, match="strength"):
        model.sample(prompts, num_steps=4, init_latents=latents, strength=0.0)


def test_latents_with_a_frame_axis_noise_per_sample(tiny_pipelines):
    model = DiffusionModel.from_pretrained(tiny_pipelines["sd"], lora_rank=4)
    x0 = torch.randn(2, 4, 5, 8, 8)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 999])
    x_t = model.noise.add_noise(x0, noise, t)
    assert x_t.shape == x0.shape
    abar = model.noise.alphas_cumprod[t].float()
    for i in range(2):  # each sample gets its own timestep's coefficients on every frame
        expected = abar[i].sqrt() * x0[i] + (1 - abar[i]).sqrt() * noise[i]
        assert torch.allclose(x_t[i], expected, atol=1e-5)


def test_conditioning_tile_repeat_and_cat():
    c = Conditioning(torch.arange(4.0).view(2, 1, 2), torch.ones(2, 3))
    assert torch.equal(c.tile(2).embeds[:, 0, 0], torch.tensor([0.0, 2.0, 0.0, 2.0]))
    assert torch.equal(c.repeat(2).embeds[:, 0, 0], torch.tensor([0.0, 0.0, 2.0, 2.0]))
    joined = Conditioning.cat([c, c[:1]])
    assert joined.embeds.shape[0] == 3 and joined.pooled.shape == (3, 3) and joined.time_ids is None


def test_unsupported_pipeline_is_a_clear_error():
    from mmalign.models.families import family_of

    with pytest.raises(ValueError, match="unsupported pipeline class") as error:
        family_of(object())
    for name in (
        "StableDiffusion3Pipeline",
        "FluxPipeline",
        "QwenImagePipeline",
        "WanPipeline",
        "HunyuanVideoPipeline",
    ):
        assert name in str(error.value)


def test_tiny_tokenizer_leaves_no_temporary_folder_and_saves(tmp_path, monkeypatch):
    """Building a tiny pipeline's tokenizer writes its files to a scratch folder that is gone afterwards."""
    import tempfile

    from mmalign.models.tokenizers import clip_tokenizer

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    tokenizer = clip_tokenizer(["a", "red", "ball"], model_max_length=16)
    assert list((tmp_path / "scratch").iterdir()) == []
    ids = tokenizer("a red ball").input_ids
    tokenizer.save_pretrained(tmp_path / "saved")
    assert ids == type(tokenizer).from_pretrained(tmp_path / "saved")("a red ball").input_ids
    kept = clip_tokenizer(["ball"], tmp_path / "kept")
    assert {p.name for p in (tmp_path / "kept").iterdir()} == {"vocab.json", "merges.txt"}
    assert kept.decode(kept("ball").input_ids, skip_special_tokens=True).strip() == "ball"
