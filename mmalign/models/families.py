"""Per-family glue between `DiffusionModel` and a diffusers pipeline.

A family knows what differs between pipeline classes, and nothing else: how to turn prompts into
the conditioning its denoiser reads, how to call the denoiser, which attribute holds it, and how
its autoencoder maps pixels to normalised latents (per image, per frame, or causally over time).
Everything else (noise, targets, sampling, LoRA, saving) is shared in `DiffusionModel`.

Image families take pixels `(B, 3, H, W)` and give latents `(B, C, h, w)`; video families take
`(B, 3, T, H, W)` and give `(B, C, F, h, w)` with `F = latent_frame_count(T)`. Families whose
transformer reads 2×2 patches packed into tokens (FLUX.1, Qwen-Image) pack and unpack inside
`denoise`, so noise, targets, trajectories and the scheduler all see `(B, C, h, w)` latents.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace

import numpy as np
import torch
from diffusers import (
    AnimateDiffPipeline,
    FluxPipeline,
    HunyuanVideoPipeline,
    QwenImagePipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    WanPipeline,
)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE as HUNYUAN_VIDEO_TEMPLATE


@dataclass
class Conditioning:
    """Text conditioning for a batch of B prompts.

    `embeds`: `(B, L, D)` token states; `pooled`: `(B, P)` pooled text embedding (SDXL, SD3, FLUX.1);
    `time_ids`: `(B, 6)` SDXL micro-conditioning (original size, crop, target size); `mask`: `(B, L)`
    1 for the tokens of `embeds` the denoiser attends to, 0 for padding (Qwen-Image, whose prompts
    are as long as their text; HunyuanVideo); `guidance`: `(B,)` the guidance value a
    guidance-distilled transformer reads (FLUX.1-dev, HunyuanVideo), in the pipeline's
    `guidance_scale` units.
    """

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    guidance: torch.Tensor | None = None

    _OPTIONAL = ("pooled", "time_ids", "mask", "guidance")

    def _map(self, fn) -> Conditioning:
        optional = {name: None if getattr(self, name) is None else fn(getattr(self, name)) for name in self._OPTIONAL}
        return replace(self, embeds=fn(self.embeds), **optional)

    def repeat(self, n: int) -> Conditioning:
        """Each row repeated `n` times in place: `[a, b] → [a, a, b, b]` for n = 2."""
        return self._map(lambda x: x.repeat_interleave(n, dim=0))

    def tile(self, n: int) -> Conditioning:
        """The whole batch repeated `n` times: `[a, b] → [a, b, a, b]` for n = 2."""
        return self._map(lambda x: x.repeat(n, *([1] * (x.ndim - 1))))

    def __getitem__(self, index) -> Conditioning:
        return self._map(lambda x: x[index])

    @staticmethod
    def cat(parts: list[Conditioning]) -> Conditioning:
        """The rows of `parts` in order; masked token states of different lengths are padded (mask 0)."""
        length = max(p.embeds.shape[1] for p in parts)
        if any(p.embeds.shape[1] != length for p in parts):
            if any(p.mask is None for p in parts):
                raise ValueError("token states of different lengths can only be joined with their masks")
            parts = [p._padded(length) for p in parts]

        def join(name: str):
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else torch.cat(values)

        return Conditioning(join("embeds"), **{name: join(name) for name in Conditioning._OPTIONAL})

    def _padded(self, length: int) -> Conditioning:
        """Token states and mask zero-padded at the end to `length` tokens."""
        extra = length - self.embeds.shape[1]
        return replace(
            self,
            embeds=torch.nn.functional.pad(self.embeds, (0, 0, 0, extra)),
            mask=torch.nn.functional.pad(self.mask, (0, extra)),
        )

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> Conditioning:
        return self._map(lambda x: x.to(device=device, dtype=dtype if x.is_floating_point() else None))


class Family(ABC):
    """Base: the denoiser attribute name, prompt encoding, the denoiser call and the autoencoder."""

    name = "base"
    denoiser_attr = "unet"
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    #: a regex of modules LoRA never adapts, whatever the targets (layers the pipeline calls in a way
    #: peft's LoRA layers cannot take); None = none
    lora_excluded: str | None = None
    is_video = False
    #: latent frame 0 holds pixel frame 0 alone, then each latent frame `temporal_compression` frames
    causal_time = False
    #: the guidance value a guidance-distilled denoiser reads in training when none is configured
    default_embedded_guidance = 3.5

    @abstractmethod
    def encode_prompt(self, pipe, prompts: list[str], resolution: tuple[int, int]) -> Conditioning:
        """Conditioning for `prompts` at image `resolution` (height, width) in pixels."""

    def denoise(self, denoiser, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return denoiser(latents, t, encoder_hidden_states=cond.embeds, return_dict=False)[0]

    def latent_channels(self, denoiser) -> int:
        """Channels `C` of the latents the wrapper handles (the denoiser's input channels)."""
        return int(denoiser.config.in_channels)

    def embeds_guidance(self, denoiser) -> bool:
        """Whether the denoiser reads the guidance value as an input (guidance-distilled, no negative pass:
        its config's `guidance_embeds`); `denoise` then passes `cond.guidance` on."""
        return bool(denoiser.config.get("guidance_embeds", False))

    def combine_guidance(self, uncond: torch.Tensor, text: torch.Tensor, scale: float) -> torch.Tensor:
        """Classifier-free guidance of two predictions `(B, …)`: `u + g·(c − u)`."""
        return uncond + scale * (text - uncond)

    def image_tokens(self, denoiser, shape: tuple[int, ...]) -> int:
        """The image token count a resolution-dependent scheduler shift reads for latents of `shape`
        (2×2 patches of the latent cells)."""
        return int(torch.tensor(shape[2:]).prod()) // 4

    def inference_sigmas(self, num_steps: int) -> np.ndarray | None:
        """The σ grid (before the resolution shift) the pipeline hands its scheduler; None = the scheduler's own."""
        return None

    def spatial_compression(self, vae) -> int:
        return 2 ** (len(vae.config.block_out_channels) - 1)

    def temporal_compression(self, vae) -> int:
        return 1

    def latent_frame_count(self, vae, pixel_frames: int) -> int:
        """Latent frames the autoencoder makes of `pixel_frames` frames (1 for images)."""
        k = self.temporal_compression(vae)
        if not self.causal_time:
            return pixel_frames // k
        if (pixel_frames - 1) % k:
            raise ValueError(f"{self.name} videos need 1 + {k}·n frames, got {pixel_frames}")
        return 1 + (pixel_frames - 1) // k

    def vae_encode(self, vae, pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """`pixels` in [-1, 1] → normalised latents (a posterior sample)."""
        return self.posterior_sample(vae, vae.encode(pixels).latent_dist, generator)

    def posterior_sample(
        self, vae, posterior: DiagonalGaussianDistribution, generator: torch.Generator | list | None
    ) -> torch.Tensor:
        """A draw from the autoencoder's posterior over `(B, C, …)` latents, normalised as the denoiser reads it."""
        latents = posterior.sample(generator=generator) if generator is not None else posterior.sample()
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def vae_decode(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents → pixels in [-1, 1] (unclamped)."""
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return vae.decode(latents / vae.config.scaling_factor + shift).sample


class StableDiffusionFamily(Family):
    name = "sd"

    def encode_prompt(self, pipe, prompts, resolution):
        embeds, _ = pipe.encode_prompt(prompts, pipe.device, 1, False)
        return Conditioning(embeds)


class StableDiffusionXLFamily(Family):
    name = "sdxl"

    def encode_prompt(self, pipe, prompts, resolution):
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts, device=pipe.device, num_images_per_prompt=1, do_classifier_free_guidance=False
        )
        height, width = resolution
        time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=embeds.dtype).repeat(len(prompts), 1)
        return Conditioning(embeds, pooled, time_ids.to(embeds.device))

    def denoise(self, denoiser, latents, t, cond):
        added = {"text_embeds": cond.pooled, "time_ids": cond.time_ids}
        return denoiser(latents, t, encoder_hidden_states=cond.embeds, added_cond_kwargs=added, return_dict=False)[0]


class StableDiffusion3Family(Family):
    name = "sd3"
    denoiser_attr = "transformer"

    def encode_prompt(self, pipe, prompts, resolution):
        # SD3 pads T5 prompts to 256 tokens; a T5 tokenizer with a shorter context bounds it
        t5 = pipe.tokenizer_3
        max_tokens = 256 if t5 is None else min(256, int(t5.model_max_length))
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=pipe.device, do_classifier_free_guidance=False,
            max_sequence_length=max_tokens,
        )  # fmt: skip
        return Conditioning(embeds, pooled)

    def image_tokens(self, denoiser, shape):
        return int(torch.tensor(shape[2:]).prod()) // int(denoiser.config.patch_size) ** 2

    def denoise(self, denoiser, latents, t, cond):
        return denoiser(
            hidden_states=latents,
            timestep=t,
            encoder_hidden_states=cond.embeds,
            pooled_projections=cond.pooled,
            return_dict=False,
        )[0]


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """`(B, C, h, w)` latents → `(B, (h/2)·(w/2), 4C)` tokens of 2×2 patches, as FLUX.1 and Qwen-Image read them."""
    b, c, h, w = latents.shape
    if h % 2 or w % 2:
        raise ValueError(f"packed 2×2 latents need an even height and width, got {h}×{w}")
    patches = latents.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack_latents`: `(B, (h/2)·(w/2), 4C)` → `(B, C, h, w)` for `height` h, `width` w."""
    b, _, d = tokens.shape
    patches = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, d // 4, height, width)


class PackedFlowFamily(Family):
    """Flow-matching transformers on 2×2 patches packed into tokens (FLUX.1, Qwen-Image).

    The pipelines hand their scheduler the σ grid `linspace(1, 1/N, N)` shifted by the resolution
    (`mu` from the image token count), and a guidance-distilled transformer reads the guidance
    value instead of running a negative prompt.
    """

    denoiser_attr = "transformer"

    def denoise(self, denoiser, latents, t, cond):
        _, _, h, w = latents.shape
        out = denoiser(
            hidden_states=pack_latents(latents),
            timestep=t.to(latents.dtype) / 1000,
            guidance=cond.guidance,
            encoder_hidden_states=cond.embeds,
            return_dict=False,
            **self.token_inputs(latents, cond),
        )[0]
        return unpack_latents(out, h, w)

    @abstractmethod
    def token_inputs(self, latents: torch.Tensor, cond: Conditioning) -> dict:
        """The transformer's other inputs for latents `(B, C, h, w)`: token positions, masks, pooled text."""

    def latent_channels(self, denoiser):
        return int(denoiser.config.in_channels) // 4

    def inference_sigmas(self, num_steps):
        return np.linspace(1.0, 1 / num_steps, num_steps)


class FluxFamily(PackedFlowFamily):
    """FLUX.1-class text-to-image: an MM-DiT with single-stream blocks on packed latents, a CLIP text
    encoder for the pooled embedding and a T5 encoder for the token states, a KL autoencoder with
    `shift_factor`; FLUX.1-dev embeds the guidance value, FLUX.1-schnell has no guidance input."""

    name = "flux"

    def encode_prompt(self, pipe, prompts, resolution):
        # FLUX pads T5 prompts to 512 tokens; a tokenizer with a shorter context bounds it
        max_tokens = min(512, int(pipe.tokenizer_2.model_max_length))
        embeds, pooled, _ = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, device=pipe.device, max_sequence_length=max_tokens
        )
        return Conditioning(embeds, pooled)

    def token_inputs(self, latents, cond):
        b, _, h, w = latents.shape
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, cond.embeds.dtype)
        txt_ids = torch.zeros(cond.embeds.shape[1], 3, device=latents.device, dtype=cond.embeds.dtype)
        return {"pooled_projections": cond.pooled, "txt_ids": txt_ids, "img_ids": img_ids}


class QwenImageFamily(PackedFlowFamily):
    """Qwen-Image-class text-to-image: an MM-DiT on packed latents reading the last hidden states of a
    Qwen2.5-VL language model (each prompt as long as its text, with a mask), and a causal video
    autoencoder used on single frames (per-channel mean/std). Its classifier-free guidance rescales
    the guided prediction of each token to the norm of the text-conditioned one."""

    name = "qwen-image"

    def encode_prompt(self, pipe, prompts, resolution):
        embeds, mask = pipe.encode_prompt(prompts, device=pipe.device)
        if mask is None:  # the pipeline drops a mask of ones; batches of other lengths need it to pad
            mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return Conditioning(embeds, mask=mask)

    def token_inputs(self, latents, cond):
        b, _, h, w = latents.shape
        return {"encoder_hidden_states_mask": cond.mask, "img_shapes": [[(1, h // 2, w // 2)]] * b}

    def combine_guidance(self, uncond, text, scale):
        guided = pack_latents(super().combine_guidance(uncond, text, scale))
        text_norm = torch.linalg.vector_norm(pack_latents(text), dim=-1, keepdim=True)
        guided_norm = torch.linalg.vector_norm(guided, dim=-1, keepdim=True)
        return unpack_latents(guided * (text_norm / guided_norm), *text.shape[2:])

    def spatial_compression(self, vae):
        return 2 ** len(vae.config.temperal_downsample)

    def vae_encode(self, vae, pixels, generator):
        dist = vae.encode(pixels.unsqueeze(2)).latent_dist  # one frame: (B, 3, 1, H, W)
        latents = dist.sample(generator=generator) if generator is not None else dist.sample()
        mean, std = channel_stats(vae, latents)
        return ((latents - mean) / std).squeeze(2)

    def vae_decode(self, vae, latents):
        mean, std = channel_stats(vae, latents.unsqueeze(2))
        return vae.decode(latents.unsqueeze(2) * std + mean).sample[:, :, 0]


def channel_stats(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The autoencoder's per-channel latent mean and std (`latents_mean`, `latents_std`), shaped
    `(1, C, 1, …)` to broadcast over `like (B, C, …)`."""
    shape = (1, vae.config.z_dim) + (1,) * (like.ndim - 2)
    mean = torch.tensor(vae.config.latents_mean, dtype=like.dtype, device=like.device).view(shape)
    std = torch.tensor(vae.config.latents_std, dtype=like.dtype, device=like.device).view(shape)
    return mean, std


class WanFamily(Family):
    """Wan-class text-to-video: a 3D flow-matching transformer on `(B, C, F, h, w)` latents, a UMT5
    text encoder and a causal video autoencoder (4× in time, 8× in space, per-channel mean/std)."""

    name = "wan"
    denoiser_attr = "transformer"
    is_video = True
    causal_time = True

    def encode_prompt(self, pipe, prompts, resolution):
        # Wan pads every prompt to 226 tokens; a tokenizer with a shorter context bounds it
        max_tokens = min(226, int(pipe.tokenizer.model_max_length))
        embeds, _ = pipe.encode_prompt(
            prompts, do_classifier_free_guidance=False, max_sequence_length=max_tokens, device=pipe.device
        )
        return Conditioning(embeds)

    def denoise(self, denoiser, latents, t, cond):
        return denoiser(hidden_states=latents, timestep=t, encoder_hidden_states=cond.embeds, return_dict=False)[0]

    def spatial_compression(self, vae):
        return int(vae.config.scale_factor_spatial)

    def temporal_compression(self, vae):
        return int(vae.config.scale_factor_temporal)

    def posterior_sample(self, vae, posterior, generator):
        latents = posterior.sample(generator=generator) if generator is not None else posterior.sample()
        mean, std = channel_stats(vae, latents)
        return (latents - mean) / std

    def vae_decode(self, vae, latents):
        mean, std = channel_stats(vae, latents)
        return vae.decode(latents * std + mean).sample


class HunyuanVideoFamily(Family):
    """HunyuanVideo: a guidance-distilled MM-DiT on `(B, C, F, h, w)` latents reading a Llama model's
    third-to-last hidden states (the pipeline's system prompt cropped off, with a mask) and a CLIP
    pooled embedding, and a causal video autoencoder (4× in time, 8× in space)."""

    name = "hunyuan-video"
    denoiser_attr = "transformer"
    is_video = True
    causal_time = True
    default_embedded_guidance = 6.0  # HunyuanVideoPipeline's guidance_scale default

    def encode_prompt(self, pipe, prompts, resolution):
        # the pipeline pads prompts to 256 tokens after its template; a tokenizer with a shorter context bounds it
        room = int(pipe.tokenizer.model_max_length) - HUNYUAN_VIDEO_TEMPLATE["crop_start"]
        embeds, pooled, mask = pipe.encode_prompt(
            prompt=prompts,
            prompt_template=HUNYUAN_VIDEO_TEMPLATE,
            device=pipe.device,
            max_sequence_length=min(256, room),
        )
        return Conditioning(embeds, pooled, mask=mask)

    def denoise(self, denoiser, latents, t, cond):
        return denoiser(
            hidden_states=latents,
            timestep=t.to(latents.dtype),
            encoder_hidden_states=cond.embeds,
            encoder_attention_mask=cond.mask,
            pooled_projections=cond.pooled,
            guidance=None if cond.guidance is None else cond.guidance.to(latents.dtype) * 1000,
            return_dict=False,
        )[0]

    def inference_sigmas(self, num_steps):
        return np.linspace(1.0, 0.0, num_steps + 1)[:-1]

    def spatial_compression(self, vae):
        return int(vae.config.spatial_compression_ratio)

    def temporal_compression(self, vae):
        return int(vae.config.temporal_compression_ratio)


class AnimateDiffFamily(StableDiffusionFamily):
    """AnimateDiff: an SD UNet with motion modules (`UNetMotionModel`) on `(B, C, F, h, w)` latents;
    frames go through the image autoencoder one by one, so latent frames = pixel frames."""

    name = "animatediff"
    is_video = True
    # diffusers calls the motion modules' projections by keyword (`proj_in(input=…)`), which peft's LoRA
    # layers do not accept: `proj_in` / `proj_out` targets adapt the spatial transformers' only
    lora_excluded = r".*motion_modules\.\d+\.proj_(in|out)"

    def denoise(self, denoiser, latents, t, cond):
        frames = latents.shape[2]  # the motion UNet reads text states repeated per frame: (B·F, L, D)
        embeds = cond.embeds.repeat_interleave(frames, dim=0)
        return denoiser(latents, t, encoder_hidden_states=embeds, return_dict=False)[0]

    def vae_encode(self, vae, pixels, generator):
        batch, frames = pixels.shape[0], pixels.shape[2]
        flat = pixels.permute(0, 2, 1, 3, 4).flatten(0, 1)
        latents = super().vae_encode(vae, flat, generator)
        return latents.unflatten(0, (batch, frames)).permute(0, 2, 1, 3, 4)

    def vae_decode(self, vae, latents):
        batch, frames = latents.shape[0], latents.shape[2]
        pixels = super().vae_decode(vae, latents.permute(0, 2, 1, 3, 4).flatten(0, 1))
        return pixels.unflatten(0, (batch, frames)).permute(0, 2, 1, 3, 4)


_FAMILIES: tuple[tuple[type, type[Family]], ...] = (
    (StableDiffusionXLPipeline, StableDiffusionXLFamily),
    (StableDiffusion3Pipeline, StableDiffusion3Family),
    (FluxPipeline, FluxFamily),
    (QwenImagePipeline, QwenImageFamily),
    (StableDiffusionPipeline, StableDiffusionFamily),
    (WanPipeline, WanFamily),
    (AnimateDiffPipeline, AnimateDiffFamily),
    (HunyuanVideoPipeline, HunyuanVideoFamily),
)


def family_of(pipe) -> Family:
    """The family adapter for a loaded pipeline; a clear error for unsupported classes."""
    for pipeline_class, family in _FAMILIES:
        if isinstance(pipe, pipeline_class):
            return family()
    supported = ", ".join(cls.__name__ for cls, _ in _FAMILIES)
    raise ValueError(f"unsupported pipeline class {type(pipe).__name__}; mmalign trains {supported}")
