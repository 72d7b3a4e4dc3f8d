"""Offline builders of tiny instances of real diffusers architectures.

Each builder assembles a real pipeline class (`StableDiffusionPipeline`, `StableDiffusionXLPipeline`,
`StableDiffusion3Pipeline` as SD3 or SD3.5) from small randomly initialised components and a local tokenizer,
saves it with `save_pretrained`, and returns the folder. Everything downstream then loads it
with `from_pretrained`, exactly as it loads a real checkpoint. Modules built from a config start
in train mode (dropout on), so every component is put in `.eval()` before saving.

The embedded shapes model uses `sd_pipeline(EMBEDDED_SD)`: the same code path with larger sizes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedTokenizerFast,
    T5Config,
    T5EncoderModel,
)

from mmalign.data import shapes_world
from mmalign.models.tokenizers import clip_tokenizer, t5_tokenizer

#: Words every tiny tokenizer covers as whole tokens: the shapes world plus a few common ones.
WORDS: tuple[str, ...] = tuple(
    sorted(
        set(shapes_world.COLOURS)
        | set(shapes_world.SHAPES)
        | {w for rel in shapes_world.RELATIONS for w in rel.split()}
        | set(
            [
                "a",
                "an",
                "the",
                "of",
                "photo",
                "picture",
                "image",
                "cat",
                "dog",
                "ball",
                "red",
                "and",
                "on",
                "in",
                "with",
            ]
        )
    )
)
FAMILIES: tuple[str, ...] = ("sd", "sd-v", "sdxl", "sd3", "sd3.5")


@dataclass(frozen=True)
class SDSize:
    """Sizes of a Stable-Diffusion-class stack (UNet or SD3 transformer + KL autoencoder + CLIP text encoders)."""

    unet_channels: tuple[int, ...] = (32, 64)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    vae_channels: tuple[int, ...] = (32, 64)  # len(vae_channels) - 1 halvings of the resolution
    text_hidden: int = 32
    text_layers: int = 2
    text_heads: int = 4
    max_tokens: int = 20
    image_size: int = 32
    # the SD3-class MM-DiT (`sd3_pipeline`); its width is heads × head dim
    transformer_layers: int = 2
    transformer_heads: int = 4
    transformer_head_dim: int = 8
    transformer_pos_embed_max_size: int = 96  # side of the stored sin-cos position table, in patches
    # SD3.5 options: RMS norm on queries and keys, the MMDiT-X second attention in these blocks, a T5
    # text encoder of this width (0 = none, as the SD3 pipeline allows)
    transformer_qk_norm: str | None = None
    transformer_dual_attention_layers: tuple[int, ...] = ()
    t5_dim: int = 0


TINY_SD = SDSize()
EMBEDDED_SD = SDSize(
    unet_channels=(64, 128, 128),
    layers_per_block=1,
    attention_head_dim=16,
    vae_channels=(16, 32, 64),
    text_hidden=64,
    text_layers=3,
    text_heads=4,
)
#: SD3.5-class: QK RMS norm (SD3.5 Large and Medium), a dual-attention block (Medium's MMDiT-X), T5.
TINY_SD35 = SDSize(transformer_qk_norm="rms_norm", transformer_dual_attention_layers=(0,), t5_dim=64)
#: The embedded flow-matching model (`embedded:shapes-t2i-flow`, `scripts/train_shapes_flow.py`): the
#: autoencoder and text-encoder sizes of `EMBEDDED_SD` and a 5-layer MM-DiT of width 128 on 8×8 latents.
EMBEDDED_SD3 = SDSize(
    vae_channels=(16, 32, 64),
    text_hidden=64,
    text_layers=3,
    text_heads=4,
    transformer_layers=5,
    transformer_heads=4,
    transformer_head_dim=32,
    transformer_pos_embed_max_size=8,
)


def _text_config(tokenizer: CLIPTokenizer, size: SDSize, hidden: int | None = None, **extra) -> CLIPTextConfig:
    hidden = hidden or size.text_hidden
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_attention_heads=size.text_heads,
        num_hidden_layers=size.text_layers,
        max_position_embeddings=size.max_tokens,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def t5_encoder(tokenizer: PreTrainedTokenizerFast, width: int) -> T5EncoderModel:
    """A randomly initialised 2-layer `T5EncoderModel` of `width` over `tokenizer` (`t5_tokenizer`)."""
    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer), d_model=width, d_kv=8, d_ff=2 * width, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=0,
        )
    )  # fmt: skip


def _vae(size: SDSize, **extra) -> AutoencoderKL:
    n = len(size.vae_channels)
    return AutoencoderKL(
        block_out_channels=list(size.vae_channels),
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        latent_channels=4,
        norm_num_groups=min(32, size.vae_channels[0]),
        sample_size=size.image_size,
        **extra,
    )


def _down_up_types(n: int) -> tuple[list[str], list[str]]:
    down = ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * (n - 1)
    up = ["CrossAttnUpBlock2D"] * (n - 1) + ["UpBlock2D"]
    return down, up


def _ddim(prediction_type: str) -> DDIMScheduler:
    return DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
        timestep_spacing="leading",
    )


def _eval(*modules: torch.nn.Module) -> None:
    for module in modules:
        module.eval()


def sd_pipeline(size: SDSize = TINY_SD, prediction_type: str = "epsilon", seed: int = 0) -> StableDiffusionPipeline:
    """A randomly initialised SD1.x/2.x-class pipeline (ε- or v-prediction) at `size`."""
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(WORDS, model_max_length=size.max_tokens)
    down, up = _down_up_types(len(size.unet_channels))
    unet = UNet2DConditionModel(
        sample_size=size.image_size // 2 ** (len(size.vae_channels) - 1),
        in_channels=4,
        out_channels=4,
        block_out_channels=size.unet_channels,
        layers_per_block=size.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=size.text_hidden,
        attention_head_dim=size.attention_head_dim,
        norm_num_groups=min(32, size.unet_channels[0]),
    )
    text_encoder = CLIPTextModel(_text_config(tokenizer, size))
    vae = _vae(size)
    _eval(unet, text_encoder, vae)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=_ddim(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def sdxl_pipeline(size: SDSize = TINY_SD, seed: int = 0) -> StableDiffusionXLPipeline:
    """A randomly initialised SDXL-class pipeline: two CLIP text encoders and time-id conditioning."""
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(WORDS, model_max_length=size.max_tokens)
    hidden = size.text_hidden
    projection = hidden
    down, up = _down_up_types(len(size.unet_channels))
    unet = UNet2DConditionModel(
        sample_size=size.image_size // 2 ** (len(size.vae_channels) - 1),
        in_channels=4,
        out_channels=4,
        block_out_channels=size.unet_channels,
        layers_per_block=size.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        cross_attention_dim=2 * hidden,  # the two encoders' hidden states are concatenated
        attention_head_dim=tuple(max(1, c // 16) for c in size.unet_channels),
        transformer_layers_per_block=tuple(range(1, len(size.unet_channels) + 1)),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=projection + 6 * 8,
        norm_num_groups=1,
    )
    text_encoder = CLIPTextModel(_text_config(tokenizer, size, hidden_act="gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(tokenizer, size, projection_dim=projection, hidden_act="gelu")
    )
    vae = _vae(size)
    _eval(unet, text_encoder, text_encoder_2, vae)
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=_ddim("epsilon"),
    )


def sd3_pipeline(size: SDSize = TINY_SD, seed: int = 0) -> StableDiffusion3Pipeline:
    """A randomly initialised SD3-class pipeline: MM-DiT transformer, flow-matching scheduler; with
    `size.t5_dim` a T5 third text encoder, whose states the two CLIP encoders' are padded to."""
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(WORDS, model_max_length=size.max_tokens)
    hidden = size.text_hidden
    text_encoder_3 = tokenizer_3 = None
    if size.t5_dim:
        tokenizer_3 = t5_tokenizer([" ".join(WORDS)], size.max_tokens)
        text_encoder_3 = t5_encoder(tokenizer_3, size.t5_dim)
    transformer = SD3Transformer2DModel(
        sample_size=size.image_size // 2 ** (len(size.vae_channels) - 1),
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=size.transformer_layers,
        attention_head_dim=size.transformer_head_dim,
        num_attention_heads=size.transformer_heads,
        caption_projection_dim=size.transformer_heads * size.transformer_head_dim,
        joint_attention_dim=size.t5_dim or 2 * hidden,  # T5's width, else the two CLIP encoders' concatenated
        pooled_projection_dim=2 * hidden,
        pos_embed_max_size=size.transformer_pos_embed_max_size,
        qk_norm=size.transformer_qk_norm,
        dual_attention_layers=size.transformer_dual_attention_layers,
    )
    text_encoder = CLIPTextModelWithProjection(_text_config(tokenizer, size, projection_dim=hidden, hidden_act="gelu"))
    text_encoder_2 = CLIPTextModelWithProjection(
        _text_config(tokenizer, size, projection_dim=hidden, hidden_act="gelu")
    )
    vae = _vae(size, shift_factor=0.0, use_quant_conv=False, use_post_quant_conv=False)
    _eval(*(m for m in (transformer, text_encoder, text_encoder_2, text_encoder_3, vae) if m is not None))
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def build_tiny_pipeline(family: str, directory: str | Path, seed: int = 0) -> Path:
    """Build, `.eval()` and `save_pretrained` a tiny pipeline of `family` (one of `FAMILIES`)."""
    if family == "sd":
        pipe = sd_pipeline(seed=seed)
    elif family == "sd-v":
        pipe = sd_pipeline(prediction_type="v_prediction", seed=seed)
    elif family == "sdxl":
        pipe = sdxl_pipeline(seed=seed)
    elif family == "sd3":
        pipe = sd3_pipeline(seed=seed)
    elif family == "sd3.5":
        pipe = sd3_pipeline(TINY_SD35, seed=seed)
    else:
        raise ValueError(f"unknown tiny family {family!r}; expected one of {FAMILIES}")
    directory = Path(directory)
    pipe.save_pretrained(directory)
    return directory


def clip_model(
    tokenizer: CLIPTokenizer,
    hidden: int = 64,
    text_layers: int = 3,
    vision_layers: int = 4,
    image_size: int = 32,
    patch_size: int = 4,
) -> CLIPModel:
    """A randomly initialised transformers `CLIPModel` (the embedded toy CLIP uses the defaults)."""
    text = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=4,
        num_hidden_layers=text_layers,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        image_size=image_size,
        patch_size=patch_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_attention_heads=4,
        num_hidden_layers=vision_layers,
    )
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=hidden)).eval()


def clip_processor(tokenizer: CLIPTokenizer, image_size: int = 32) -> CLIPProcessor:
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    return CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)


def tiny_clip(directory: str | Path, seed: int = 0) -> Path:
    """Save a tiny random transformers CLIP folder (model, tokenizer, image processor)."""
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer(WORDS, model_max_length=TINY_SD.max_tokens)
    directory = Path(directory)
    clip_model(tokenizer, hidden=32, text_layers=2, vision_layers=2).save_pretrained(directory)
    clip_processor(tokenizer).save_pretrained(directory)
    return directory


def tiny_open_clip(directory: str | Path, seed: int = 0) -> Path:
    """Save a tiny random open_clip model as a `local-dir:` folder (config + safetensors)."""
    import json

    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model_cfg = {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
    }
    model = open_clip.CLIP(**model_cfg)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    preprocess = {"size": 32, "mean": list(open_clip.OPENAI_DATASET_MEAN), "std": list(open_clip.OPENAI_DATASET_STD)}
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": preprocess}))
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "open_clip_model.safetensors")
    )
    return directory
