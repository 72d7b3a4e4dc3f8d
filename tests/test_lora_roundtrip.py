"""The LoRA a user loads is the one trained: every family, every target set, through `pipe.load_lora_weights`
and merged into a saved pipeline."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import save_file

from mmalign.models.diffusion import DiffusionModel
from mmalign.models.lora import LORA_FILE, LoraLoadError, adapter_keys, load_lora

#: an MM-DiT's joint attention: the image stream's projections and the text stream's
JOINT = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
#: per family: the default targets and a broad set (attention, feed-forward, projections, convolutions)
BROAD = {
    "sd": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"],
    "sd-v": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"],
    "sdxl": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"],
    "sd3": [*JOINT, "ff.net.2"],
    "sd3.5": [*JOINT, "ff.net.2"],
    "flux": [*JOINT, "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out"],
    "qwen-image": [*JOINT, "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2"],
    "wan": ["to_q", "to_k", "to_v", "to_out.0", "ffn.net.0.proj", "ffn.net.2", "proj_out"],
    "hunyuan-video": [*JOINT, "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "proj_mlp", "proj_out"],
    "animatediff": ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "conv1", "conv2"],
}
CASES = [(family, targets) for family in BROAD for targets in (None, "broad")]


def _trained(path, targets, alpha: int | None) -> DiffusionModel:
    model = DiffusionModel.from_pretrained(str(path), lora_rank=4, lora_alpha=alpha, lora_targets=targets,
                                           reference=False)  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained adapter: every LoRA matrix away from its initialisation
        for param in model.base_denoiser.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return model


def _output(model: DiffusionModel) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    resolution = (32, 32)  # the tiny image pipelines' own; FLUX.1 / Qwen-Image default to 128 latent cells
    frames = {"num_frames": 5} if model.is_video else {}
    x_t = torch.randn(model.latent_shape(1, resolution, **frames), generator=generator)
    t = model.noise.sample_timesteps(1, generator)
    with torch.no_grad():
        return model.predict(x_t, t, model.encode_prompt(["a red circle"], resolution))


@pytest.mark.parametrize(("family", "targets"), CASES, ids=[f"{f}-{t or 'default'}" for f, t in CASES])
def test_the_loaded_adapter_is_every_trained_tensor_and_gives_the_trained_output(
    family, targets, tiny_pipelines, tiny_video_pipelines, tiny_mmdit_pipelines, tmp_path
):
    path = {**tiny_pipelines, **tiny_video_pipelines, **tiny_mmdit_pipelines}[family]
    target_list = tuple(BROAD[family]) if targets else None
    model = _trained(path, target_list, alpha=8 if targets else None)  # alpha ≠ rank must survive the trip
    model.save_lora(tmp_path / "lora")
    keys = adapter_keys(tmp_path / "lora")
    assert len(keys) == 2 * sum(1 for n, p in model.base_denoiser.named_parameters() if "lora_A" in n)

    loaded = DiffusionModel.from_pretrained(str(path), lora_rank=None, reference=False)
    load_lora(loaded.pipe, tmp_path / "lora")
    injected = [n for n, _ in loaded.base_denoiser.named_parameters() if ".lora_" in n]
    assert len(injected) == len(keys)
    trained, user = _output(model), _output(loaded)
    plain = _output(DiffusionModel.from_pretrained(str(path), lora_rank=None, reference=False))
    assert (trained - plain).abs().max() > 1e-3  # the adapter has an effect the comparison can see
    torch.testing.assert_close(user, trained, rtol=1e-4, atol=1e-5)

    model.save_pretrained(tmp_path / "merged")  # the LoRA fused into the weights of a whole pipeline
    merged = DiffusionModel.from_pretrained(str(tmp_path / "merged"), lora_rank=None, reference=False)
    torch.testing.assert_close(_output(merged), trained, rtol=1e-4, atol=1e-5)


def test_an_adapter_with_keys_the_pipeline_cannot_place_is_refused_naming_them(tiny_pipelines, tmp_path):
    model = _trained(tiny_pipelines["sd"], None, None)
    model.save_lora(tmp_path / "lora")
    from safetensors.torch import load_file

    state = load_file(str(tmp_path / "lora" / LORA_FILE))
    state["unet.no_such_block.to_q.lora_A.weight"] = torch.zeros(4, 8)
    save_file(state, str(tmp_path / "lora" / LORA_FILE))
    pipe = DiffusionPipeline.from_pretrained(str(tiny_pipelines["sd"]))
    with pytest.raises(LoraLoadError, match=r"1 of \d+ LoRA tensors have no layer .*unet.no_such_block.to_q"):
        load_lora(pipe, tmp_path / "lora")
    with pytest.raises(LoraLoadError, match="no pytorch_lora_weights.safetensors"):
        load_lora(pipe, tmp_path)
