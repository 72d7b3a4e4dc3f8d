"""The shipped flow-matching shapes model loads as an SD3-class pipeline and samples the world's images."""

from __future__ import annotations

import torch

from mmalign.models.diffusion import DiffusionModel
from mmalign.models.noise import FlowMatching


def test_embedded_flow_model_samples_and_decodes():
    model = DiffusionModel.from_pretrained("embedded:shapes-t2i-flow", lora_rank=None, reference=False)
    assert model.family.name == "sd3"
    assert isinstance(model.noise, FlowMatching)
    assert model.pipe.text_encoder_3 is None
    assert model.default_resolution == (32, 32)
    prompts = ["a red circle above a blue square", "a green triangle"]
    latents = model.sample(prompts, num_steps=4, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert latents.shape == (2, 4, 8, 8)
    assert torch.isfinite(latents).all()
    images = model.decode_latents(latents)
    assert images.shape == (2, 3, 32, 32)
    assert images.min() >= 0.0 and images.max() <= 1.0
