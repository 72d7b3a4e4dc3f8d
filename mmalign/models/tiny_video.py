"""Offline builders of tiny text-to-video pipelines of real diffusers architectures.

- `wan_pipeline`: `WanPipeline` = `WanTransformer3DModel` (flow matching, 3D RoPE) + `AutoencoderKLWan`
  (causal in time: T = 1 + 4n pixel frames give 1 + n latent frames) + `UMT5EncoderModel` with a
  byte-level BPE trained locally on a caption corpus; `wan2.2`: Wan 2.2 A14B's layout, a high-noise
  and a low-noise transformer split at `boundary_ratio`.
- `animatediff_pipeline`: `AnimateDiffPipeline` = SD `UNet2DConditionModel` + `MotionAdapter`
  (→ `UNetMotionModel`), the SD image autoencoder per frame, a CLIP text encoder.
- `hunyuan_video_pipeline`: `HunyuanVideoPipeline` = `HunyuanVideoTransformer3DModel` (guidance-distilled)
  + `AutoencoderKLHunyuanVideo` (causal, 4× in time) + a Llama text encoder and CLIP (pooled).

`build_tiny_video_pipeline(family, directory)` saves one with `save_pretrained`; everything else loads
it through `DiffusionModel.from_pretrained`, the path a real checkpoint takes. Components are put in
`.eval()` before saving (UMT5 has dropout).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from diffusers import (
    AnimateDiffPipeline,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLWan,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    MotionAdapter,
    UNet2DConditionModel,
    WanPipeline,
    WanTransformer3DModel,
)
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE as HUNYUAN_VIDEO_TEMPLATE
from transformers import CLIPTextModel, LlamaConfig, LlamaModel, PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

from mmalign.models.tiny import TINY_SD, WORDS, _text_config, _vae
from mmalign.models.tokenizers import byte_level_bpe, clip_tokenizer, t5_tokenizer

VIDEO_FAMILIES: tuple[str, ...] = ("wan", "wan2.2", "animatediff", "hunyuan-video")
DEFAULT_CAPTIONS: tuple[str, ...] = ("a red ball bounces twice", "a small blue ball falls", "a video")


@dataclass(frozen=True)
class WanSize:
    """Widths of a Wan-class stack. The VAE halves the resolution `len(vae_dim_mult) − 1` times and
    the frame count (after the first frame) `sum(temporal_downsample)` times."""

    heads: int = 2
    head_dim: int = 12
    layers: int = 2
    ffn: int = 32
    text_dim: int = 32
    text_layers: int = 2
    max_tokens: int = 16
    z_dim: int = 16
    vae_base_dim: int = 3
    vae_dim_mult: tuple[int, ...] = (1, 1, 1, 1)
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    flow_shift: float = 3.0


TINY_WAN = WanSize()
#: The embedded balls-world model: 32×32×17 clips → 8 × (9, 8, 8) latents (4× in space, 2× in time: at 4×
#: in time the small autoencoder smeared a ball that moves up to 10 px per frame).
EMBEDDED_WAN = WanSize(
    heads=4, head_dim=16, layers=4, ffn=128, text_dim=64, text_layers=2, max_tokens=16, z_dim=8, vae_base_dim=8,
    vae_dim_mult=(1, 2, 2), temporal_downsample=(False, True), flow_shift=1.0,
)  # fmt: skip


def _eval(*modules: torch.nn.Module) -> None:
    for module in modules:
        module.eval()


def wan_pipeline(
    size: WanSize = TINY_WAN,
    seed: int = 0,
    captions: Iterable[str] = DEFAULT_CAPTIONS,
    boundary_ratio: float | None = None,
) -> WanPipeline:
    """A randomly initialised Wan-class pipeline (flow-matching Euler scheduler with `flow_shift`); with
    `boundary_ratio`, Wan 2.2 A14B's two experts: a second transformer (`transformer_2`) denoises the
    timesteps below `boundary_ratio · 1000`."""
    torch.manual_seed(seed)
    tokenizer = t5_tokenizer(captions, size.max_tokens)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer), d_model=size.text_dim, d_kv=8, d_ff=2 * size.text_dim,
            num_layers=size.text_layers, num_heads=4, relative_attention_num_buckets=8,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0,
        )
    )  # fmt: skip
    experts = [
        WanTransformer3DModel(
            patch_size=(1, 2, 2),
            num_attention_heads=size.heads,
            attention_head_dim=size.head_dim,
            in_channels=size.z_dim,
            out_channels=size.z_dim,
            text_dim=size.text_dim,
            freq_dim=256,
            ffn_dim=size.ffn,
            num_layers=size.layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            rope_max_seq_len=32,
        )  # fmt: skip
        for _ in range(1 if boundary_ratio is None else 2)
    ]
    vae = AutoencoderKLWan(
        base_dim=size.vae_base_dim, z_dim=size.z_dim, dim_mult=list(size.vae_dim_mult), num_res_blocks=1,
        temperal_downsample=list(size.temporal_downsample), latents_mean=[0.0] * size.z_dim,
        latents_std=[1.0] * size.z_dim, scale_factor_temporal=2 ** sum(size.temporal_downsample),
        scale_factor_spatial=2 ** (len(size.vae_dim_mult) - 1),
    )  # fmt: skip
    _eval(text_encoder, vae, *experts)
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        transformer=experts[0],
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=size.flow_shift),
        transformer_2=experts[1] if boundary_ratio is not None else None,
        boundary_ratio=boundary_ratio,
    )


def animatediff_pipeline(seed: int = 0) -> AnimateDiffPipeline:
    """A randomly initialised AnimateDiff pipeline: tiny SD UNet + motion adapter, DDIM (ε)."""
    torch.manual_seed(seed)
    size = TINY_SD
    tokenizer = clip_tokenizer(WORDS, model_max_length=size.max_tokens)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=size.image_size // 2, in_channels=4,
        out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=size.text_hidden,
        attention_head_dim=8, norm_num_groups=32,
    )  # fmt: skip
    adapter = MotionAdapter(
        block_out_channels=(32, 64), motion_layers_per_block=1, motion_norm_num_groups=32,
        motion_num_attention_heads=4, motion_max_seq_length=32,
    )  # fmt: skip
    text_encoder = CLIPTextModel(_text_config(tokenizer, size))
    vae = _vae(size)
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1, timestep_spacing="linspace",
    )  # fmt: skip
    _eval(unet, adapter, text_encoder, vae)
    pipe = AnimateDiffPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, motion_adapter=adapter, scheduler=scheduler
    )
    pipe.unet.eval()
    return pipe


def hunyuan_video_pipeline(seed: int = 0, max_tokens: int = 16) -> HunyuanVideoPipeline:
    """A randomly initialised HunyuanVideo pipeline: guidance-distilled MM-DiT, a Llama text encoder
    over a byte-level BPE that splits the pipeline's system prompt into its 95 tokens (the pipeline
    crops exactly those), CLIP for the pooled embedding, the causal video autoencoder (4× time, 8× space)."""
    torch.manual_seed(seed)
    template = HUNYUAN_VIDEO_TEMPLATE["template"]
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    bpe = byte_level_bpe([template.format(" ".join(WORDS))], specials, 1024, add_prefix_space=False, repeats=20)
    crop = HUNYUAN_VIDEO_TEMPLATE["crop_start"]
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, pad_token="<|end_of_text|>", eos_token="<|eot_id|>", model_max_length=crop + max_tokens
    )
    prefix = len(tokenizer(template[: template.index("{}")]).input_ids)
    if prefix != crop:
        raise RuntimeError(f"the tiny Llama tokenizer splits HunyuanVideo's system prompt into {prefix} tokens")
    text_encoder = LlamaModel(
        LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=crop + max_tokens, pad_token_id=tokenizer.pad_token_id,
        )
    )  # fmt: skip
    clip_tok = clip_tokenizer(WORDS, model_max_length=77)  # the pipeline pads CLIP prompts to 77 tokens
    text_encoder_2 = CLIPTextModel(_text_config(clip_tok, replace(TINY_SD, max_tokens=77)))
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=True,
        text_embed_dim=32, pooled_projection_dim=TINY_SD.text_hidden, rope_axes_dim=(2, 4, 4),
    )  # fmt: skip
    vae = AutoencoderKLHunyuanVideo(
        latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4,
    )  # fmt: skip
    _eval(text_encoder, text_encoder_2, transformer, vae)
    return HunyuanVideoPipeline(
        text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=text_encoder_2, tokenizer_2=clip_tok,
    )  # fmt: skip


def build_tiny_video_pipeline(
    family: str, directory: str | Path, seed: int = 0, captions: Iterable[str] = DEFAULT_CAPTIONS
) -> Path:
    """Build, `.eval()` and `save_pretrained` a tiny video pipeline of `family` (one of `VIDEO_FAMILIES`)."""
    if family == "wan":
        pipe = wan_pipeline(seed=seed, captions=captions)
    elif family == "wan2.2":  # A14B's layout (T2V boundary 0.875) at the tiny size
        pipe = wan_pipeline(seed=seed, captions=captions, boundary_ratio=0.875)
    elif family == "animatediff":
        pipe = animatediff_pipeline(seed=seed)
    elif family == "hunyuan-video":
        pipe = hunyuan_video_pipeline(seed=seed)
    else:
        raise ValueError(f"unknown tiny video family {family!r}; expected one of {VIDEO_FAMILIES}")
    directory = Path(directory)
    pipe.save_pretrained(directory)
    return directory
