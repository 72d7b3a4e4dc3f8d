"""Published architecture configs of real checkpoints, to build random-weight stand-ins offline.

Each constant holds the fields of a released component's `config.json` that differ from the
library defaults (`UNet2DConditionModel`, `SD3Transformer2DModel`, `CLIPTextConfig`, …), copied from
the public checkpoints named in `REAL_MODELS`. `build_real(name, directory)` assembles the pipeline
(or VLM) from those configs with random weights and local tokenizers, and `save_pretrained`s it, so
that `DiffusionModel.from_pretrained` / `VisionLanguageModel.from_pretrained` load it exactly as they
load the real checkpoint: same module shapes, same parameter counts, same code path; only the weights
and the tokenizers' vocabularies (built locally, `mmalign.models.tokenizers`) differ.

`tiny=True` keeps every architectural choice (block types, number of resolution levels, latent
channels, attention layout) and shrinks widths and depths (`_TINY`), for CPU checks of the same code.
The T5-XXL / UMT5-XXL text encoders keep their real width but only `TEXT_ENCODER_LAYERS` of their 24
layers unless `full_text_encoders`: they encode the prompt once per step and are not what these
stand-ins measure, while their full depth would add 4.7–5.7 B parameters to build, save and load.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

#: the checkpoint whose published configs each stand-in copies
REAL_MODELS = {
    "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sdxl": "stabilityai/stable-diffusion-xl-base-1.0",
    "sd35m": "stabilityai/stable-diffusion-3.5-medium",
    "flux": "black-forest-labs/FLUX.1-dev",
    "wan13b": "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
    "qwen25vl3b": "Qwen/Qwen2.5-VL-3B-Instruct",
}
#: layers kept of the 24 of T5-XXL / UMT5-XXL (real width) unless `full_text_encoders`
TEXT_ENCODER_LAYERS = 2

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)  # fmt: skip
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=512, scaling_factor=0.18215,
)  # fmt: skip
CLIP_L = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)  # fmt: skip
CLIP_BIGG = dict(
    vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
    max_position_embeddings=77, hidden_act="gelu", projection_dim=1280,
)  # fmt: skip
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
    addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
    norm_num_groups=32,
)  # fmt: skip
SDXL_VAE = {**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
SD35M_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
    num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
    pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)  # fmt: skip
SD3_VAE = {
    **SD_VAE, "latent_channels": 16, "sample_size": 1024, "scaling_factor": 1.5305, "shift_factor": 0.0609,
    "use_quant_conv": False, "use_post_quant_conv": False,
}  # fmt: skip
FLUX_TRANSFORMER = dict(
    patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56),
)  # fmt: skip
FLUX_VAE = {**SD3_VAE, "scaling_factor": 0.3611, "shift_factor": 0.1159}
T5_XXL = dict(
    vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
    relative_attention_num_buckets=32,
)  # fmt: skip
UMT5_XXL = {**T5_XXL, "vocab_size": 256384}
WAN13B_TRANSFORMER = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
    eps=1e-6, rope_max_seq_len=1024,
)  # fmt: skip
WAN_VAE = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, temperal_downsample=[False, True, True])
QWEN25VL3B_TEXT = dict(
    vocab_size=151936, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
    num_key_value_heads=2, max_position_embeddings=128000, rms_norm_eps=1e-6, tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
)  # fmt: skip
QWEN25VL3B_VISION = dict(
    depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=2048, patch_size=14,
    spatial_merge_size=2, temporal_patch_size=2, window_size=112, fullatt_block_indexes=[7, 15, 23, 31],
    hidden_act="silu",
)  # fmt: skip

_TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
_TINY_SD_VAE = dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=8)
_TINY_T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8)
#: the widths and depths `tiny=True` replaces in each constant above (keyed by the constant's identity, so that
#: `sized(SD15_UNET, tiny)` reads as the config it shrinks); every other field stays the real one
_TINY: dict[int, dict[str, Any]] = {
    id(SD15_UNET): dict(
        block_out_channels=(32, 32, 64, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=4,
        norm_num_groups=8, sample_size=8,
    ),
    id(SD_VAE): _TINY_SD_VAE,
    id(SDXL_VAE): _TINY_SD_VAE,
    id(SD3_VAE): _TINY_SD_VAE,
    id(FLUX_VAE): _TINY_SD_VAE,
    id(CLIP_L): _TINY_CLIP,
    id(CLIP_BIGG): _TINY_CLIP,
    id(SDXL_UNET): dict(
        block_out_channels=(32, 64, 64), attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 1, 2),
        cross_attention_dim=64, addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8,
        norm_num_groups=8, layers_per_block=1, sample_size=8,
    ),
    id(SD35M_TRANSFORMER): dict(
        num_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=32,
        pooled_projection_dim=64, pos_embed_max_size=16, dual_attention_layers=(0,), sample_size=8,
    ),
    id(FLUX_TRANSFORMER): dict(
        num_layers=1, num_single_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
        pooled_projection_dim=32, axes_dims_rope=(4, 6, 6),
    ),
    id(T5_XXL): _TINY_T5,
    id(UMT5_XXL): _TINY_T5,
    id(WAN13B_TRANSFORMER): dict(
        num_attention_heads=2, attention_head_dim=16, text_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32
    ),
    id(WAN_VAE): dict(base_dim=8, dim_mult=[1, 1, 1, 1], num_res_blocks=1),
    id(QWEN25VL3B_TEXT): dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
    ),
    id(QWEN25VL3B_VISION): dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=4, out_hidden_size=64, window_size=56,
        fullatt_block_indexes=[1],
    ),
}  # fmt: skip


def sized(config: dict[str, Any], tiny: bool, **fixed: Any) -> dict[str, Any]:
    """`config`, shrunk when `tiny`, with `fixed` (token ids, vocabulary sizes) set in either case."""
    return {**config, **(_TINY[id(config)] if tiny else {}), **fixed}


def _clip_text(tokenizer, config: dict[str, Any], tiny: bool, projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    text_config = CLIPTextConfig(**sized(config, tiny, **ids))
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(text_config)


def _t5(tokenizer, config: dict[str, Any], tiny: bool, full: bool, umt5: bool):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    depth = {} if tiny or full else {"num_layers": TEXT_ENCODER_LAYERS}
    values = sized(config, tiny, **depth, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                   decoder_start_token_id=0, **({"vocab_size": len(tokenizer)} if tiny else {}))  # fmt: skip
    if umt5:
        return UMT5EncoderModel(UMT5Config(**values))
    return T5EncoderModel(T5Config(**values))


def _clip_tokenizer():
    from mmalign.models.tiny import WORDS
    from mmalign.models.tokenizers import clip_tokenizer

    return clip_tokenizer(WORDS, model_max_length=77)


def _t5_tokenizer(max_tokens: int):
    import numpy as np

    from mmalign.data import shapes_world
    from mmalign.models.tiny_video import DEFAULT_CAPTIONS, t5_tokenizer

    captions = [*DEFAULT_CAPTIONS, *shapes_world.sample_captions(64, "train", np.random.default_rng(0))]
    return t5_tokenizer(captions, max_tokens)


def _ddim():
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False, set_alpha_to_one=False,
        steps_offset=1, timestep_spacing="leading",
    )  # fmt: skip


def sd15(tiny: bool, full_text_encoders: bool):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = _clip_tokenizer()
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**sized(SD_VAE, tiny)), text_encoder=_clip_text(tokenizer, CLIP_L, tiny, False),
        tokenizer=tokenizer, unet=UNet2DConditionModel(**sized(SD15_UNET, tiny)), scheduler=_ddim(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def sdxl(tiny: bool, full_text_encoders: bool):
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = _clip_tokenizer()
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL(**sized(SDXL_VAE, tiny)), text_encoder=_clip_text(tokenizer, CLIP_L, tiny, False),
        text_encoder_2=_clip_text(tokenizer, CLIP_BIGG, tiny, True), tokenizer=tokenizer, tokenizer_2=tokenizer,
        unet=UNet2DConditionModel(**sized(SDXL_UNET, tiny)), scheduler=_ddim(),
    )  # fmt: skip


def sd35m(tiny: bool, full_text_encoders: bool):
    """SD3.5-medium without its optional T5 encoder (the pipeline pads the CLIP states to the joint width)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )

    tokenizer = _clip_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**sized(SD35M_TRANSFORMER, tiny)),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=AutoencoderKL(**sized(SD3_VAE, tiny)),
        text_encoder=_clip_text(tokenizer, CLIP_L, tiny, True), tokenizer=tokenizer,
        text_encoder_2=_clip_text(tokenizer, CLIP_BIGG, tiny, True), tokenizer_2=tokenizer,
        text_encoder_3=None, tokenizer_3=None,
    )  # fmt: skip


def flux(tiny: bool, full_text_encoders: bool):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    tokenizer, t5_tokenizer = _clip_tokenizer(), _t5_tokenizer(128)
    scheduler = FlowMatchEulerDiscreteScheduler(
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
        max_image_seq_len=4096,
    )  # fmt: skip
    return FluxPipeline(
        scheduler=scheduler, vae=AutoencoderKL(**sized(FLUX_VAE, tiny)),
        text_encoder=_clip_text(tokenizer, CLIP_L, tiny, False), tokenizer=tokenizer,
        text_encoder_2=_t5(t5_tokenizer, T5_XXL, tiny, full_text_encoders, umt5=False), tokenizer_2=t5_tokenizer,
        transformer=FluxTransformer2DModel(**sized(FLUX_TRANSFORMER, tiny)),
    )  # fmt: skip


def wan13b(tiny: bool, full_text_encoders: bool):
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    tokenizer = _t5_tokenizer(226)
    return WanPipeline(
        tokenizer=tokenizer, text_encoder=_t5(tokenizer, UMT5_XXL, tiny, full_text_encoders, umt5=True),
        transformer=WanTransformer3DModel(**sized(WAN13B_TRANSFORMER, tiny)),
        vae=AutoencoderKLWan(**sized(WAN_VAE, tiny)), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )  # fmt: skip


def qwen25vl3b(tiny: bool, full_text_encoders: bool):
    """The Qwen2.5-VL-3B model and an image-only-sized processor (images of 112×112 px, 16 image tokens)."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
    )
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    from mmalign.models.tiny_vlm import vlm_tokenizer

    tokenizer = vlm_tokenizer("qwen2.5-vl")
    ids = tokenizer.convert_tokens_to_ids
    text = sized(QWEN25VL3B_TEXT, tiny, bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                 pad_token_id=ids("<|endoftext|>"), **({"vocab_size": len(tokenizer)} if tiny else {}))  # fmt: skip
    config = Qwen2_5_VLConfig(
        text_config=text, vision_config=sized(QWEN25VL3B_VISION, tiny), image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )  # fmt: skip
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.update(
        bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>")
    )
    pixels = 112 * 112
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(min_pixels=pixels, max_pixels=pixels, patch_size=14, merge_size=2),
        tokenizer=tokenizer, video_processor=Qwen2VLVideoProcessor(), chat_template=tokenizer.chat_template,
    )  # fmt: skip
    return model, processor


BUILDERS: dict[str, Callable[[bool, bool], Any]] = {
    "sd15": sd15, "sdxl": sdxl, "sd35m": sd35m, "flux": flux, "wan13b": wan13b, "qwen25vl3b": qwen25vl3b,
}  # fmt: skip


def build_real(
    name: str,
    directory: str | Path,
    *,
    tiny: bool = False,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    full_text_encoders: bool = False,
    seed: int = 0,
) -> Path:
    """Build `name` (a key of `REAL_MODELS`) with random weights initialised on `device`, cast to `dtype`
    (autoencoders stay float32), put in eval mode and saved into `directory` with `save_pretrained`."""
    if name not in BUILDERS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(BUILDERS)}")
    torch.manual_seed(seed)
    with torch.device(device):
        built = BUILDERS[name](tiny, full_text_encoders)
    directory = Path(directory)
    if isinstance(built, tuple):  # a VLM: model and processor
        model, processor = built
        model.to(dtype=dtype) if dtype != torch.float32 else model
        model.eval().save_pretrained(directory)
        processor.save_pretrained(directory)
        return directory
    for component_name, component in built.components.items():
        if isinstance(component, torch.nn.Module):
            component.eval()
            if not component_name.startswith("vae") and dtype != torch.float32:
                component.to(dtype=dtype)
    built.save_pretrained(directory)
    return directory
