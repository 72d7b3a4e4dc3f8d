"""Offline builders of tiny FLUX.1 and Qwen-Image pipelines of the real diffusers architectures.

- `flux_pipeline`: `FluxPipeline` = `FluxTransformer2DModel` (double- and single-stream blocks on
  2×2-packed latents; a guidance embedding like FLUX.1-dev, or none like FLUX.1-schnell) + a KL
  autoencoder with `shift_factor` + CLIP (pooled) and T5 (token states) text encoders, and the
  resolution-shifted flow-matching Euler scheduler of FLUX.1.
- `qwen_image_pipeline`: `QwenImagePipeline` = `QwenImageTransformer2DModel` + `AutoencoderKLQwenImage`
  (a causal video autoencoder used on one frame) + a `Qwen2_5_VLForConditionalGeneration` whose last
  hidden states condition the transformer, over a byte-level BPE with Qwen's chat specials.

`build_tiny_mmdit_pipeline(family, directory)` saves one with `save_pretrained`; everything else
loads it through `DiffusionModel.from_pretrained`, the path a real checkpoint takes. Components
are put in `.eval()` before saving (T5 has dropout).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)
from transformers import CLIPTextModel, PreTrainedTokenizerFast

from mmalign.models.tiny import TINY_SD, WORDS, _text_config, _vae, t5_encoder
from mmalign.models.tiny_vlm import VLMSize, qwen_vl_model, vlm_tokenizer
from mmalign.models.tokenizers import clip_tokenizer, t5_tokenizer

MMDIT_FAMILIES: tuple[str, ...] = ("flux", "flux-schnell", "qwen-image")
#: The system prompt QwenImagePipeline wraps every prompt in; it drops the first
#: `prompt_template_encode_start_idx` (34) tokens of the text encoder's states.
QWEN_IMAGE_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)


@dataclass(frozen=True)
class MMDiTSize:
    """Widths of a tiny FLUX.1 / Qwen-Image transformer; `rope_axes` sum to `head_dim`."""

    heads: int = 2
    head_dim: int = 16
    layers: int = 1  # double-stream (MM-DiT) blocks
    single_layers: int = 1  # FLUX.1's single-stream blocks
    rope_axes: tuple[int, int, int] = (8, 4, 4)
    text_dim: int = 32
    max_tokens: int = 16  # FLUX.1's T5 context


TINY_MMDIT = MMDiTSize()


def _eval(*modules: torch.nn.Module) -> None:
    for module in modules:
        module.eval()


def flux_pipeline(size: MMDiTSize = TINY_MMDIT, guidance_embeds: bool = True, seed: int = 0) -> FluxPipeline:
    """A randomly initialised FLUX.1-class pipeline: FLUX.1-dev-like with `guidance_embeds`, else schnell-like."""
    torch.manual_seed(seed)
    clip_tok = clip_tokenizer(WORDS, model_max_length=TINY_SD.max_tokens)
    t5_tok = t5_tokenizer([" ".join(WORDS)], size.max_tokens)
    text_encoder = CLIPTextModel(_text_config(clip_tok, TINY_SD, hidden=size.text_dim))
    text_encoder_2 = t5_encoder(t5_tok, size.text_dim)
    vae = _vae(TINY_SD, shift_factor=0.1, scaling_factor=1.5, use_quant_conv=False, use_post_quant_conv=False)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * vae.config.latent_channels, num_layers=size.layers,
        num_single_layers=size.single_layers, attention_head_dim=size.head_dim, num_attention_heads=size.heads,
        joint_attention_dim=size.text_dim, pooled_projection_dim=size.text_dim, guidance_embeds=guidance_embeds,
        axes_dims_rope=size.rope_axes,
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )  # fmt: skip
    _eval(text_encoder, text_encoder_2, vae, transformer)
    return FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


def qwen_image_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE with Qwen's chat specials that splits the pipeline's system prompt into 34
    tokens, as Qwen2.5-VL's tokenizer does (the pipeline drops exactly those)."""
    corpus = (QWEN_IMAGE_TEMPLATE.format(" ".join(WORDS)),)
    tokenizer = vlm_tokenizer("qwen2.5-vl", corpus, vocab_size=768)
    tokenizer.padding_side = "right"
    prefix = QWEN_IMAGE_TEMPLATE[: QWEN_IMAGE_TEMPLATE.index("{}")]
    if len(tokenizer(prefix).input_ids) != 34:
        raise RuntimeError(f"the tiny Qwen tokenizer splits the system prompt into {len(tokenizer(prefix).input_ids)}")
    return tokenizer


def qwen_image_pipeline(size: MMDiTSize = TINY_MMDIT, seed: int = 0) -> QwenImagePipeline:
    """A randomly initialised Qwen-Image-class pipeline (4 latent channels, 2× spatial compression)."""
    torch.manual_seed(seed)
    tokenizer = qwen_image_tokenizer()
    text_size = VLMSize(hidden=2 * size.text_dim)
    text_encoder = qwen_vl_model("qwen2.5-vl", tokenizer, text_size)
    z_dim = 4
    vae = AutoencoderKLQwenImage(
        base_dim=8, z_dim=z_dim, dim_mult=[1, 1], num_res_blocks=1, temperal_downsample=[False],
        latents_mean=[0.1, -0.1, 0.2, 0.0], latents_std=[1.5, 0.8, 1.2, 1.0],
    )  # fmt: skip
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * z_dim, out_channels=z_dim, num_layers=size.layers,
        attention_head_dim=size.head_dim, num_attention_heads=size.heads, joint_attention_dim=text_size.hidden,
        axes_dims_rope=size.rope_axes,
    )  # fmt: skip
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9, base_image_seq_len=256,
        max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
    )  # fmt: skip
    _eval(text_encoder, vae, transformer)
    return QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )


def build_tiny_mmdit_pipeline(family: str, directory: str | Path, seed: int = 0) -> Path:
    """Build, `.eval()` and `save_pretrained` a tiny pipeline of `family` (one of `MMDIT_FAMILIES`)."""
    if family == "flux":
        pipe = flux_pipeline(seed=seed)
    elif family == "flux-schnell":
        pipe = flux_pipeline(guidance_embeds=False, seed=seed)
    elif family == "qwen-image":
        pipe = qwen_image_pipeline(seed=seed)
    else:
        raise ValueError(f"unknown tiny family {family!r}; expected one of {MMDIT_FAMILIES}")
    directory = Path(directory)
    pipe.save_pretrained(directory)
    return directory
