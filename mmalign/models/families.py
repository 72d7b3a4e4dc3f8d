"""Per-family glue between `DiffusionModel` and a diffusers pipeline.

A family knows what differs between pipeline classes, and nothing else: how to turn prompts into
the conditioning its denoiser reads, how to call the denoiser, which attribute holds it, and how
its autoencoder maps pixels to normalised latents (per image, per frame, or causally over time).
Everything else (noise, targets, sampling, LoRA, saving) is shared in `DiffusionModel`.

Image families take pixels `(B, 3, H, W)` and give latents `(B, C, h, w)`; video families take
`(B, 3, T, H, W)` and give `(B, C, F, h, w)` with `F = latent_frame_count(T)`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace

import torch
from diffusers import (
    AnimateDiffPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    WanPipeline,
)
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution


@dataclass
class Conditioning:
    """Text conditioning for a batch of B prompts.

    `embeds`: `(B, L, D)` token states; `pooled`: `(B, P)` pooled text embedding (SDXL, SD3);
    `time_ids`: `(B, 6)` SDXL micro-conditioning (original size, crop, target size).
    """

    embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def _map(self, fn) -> Conditioning:
        return replace(
            self,
            embeds=fn(self.embeds),
            pooled=None if self.pooled is None else fn(self.pooled),
            time_ids=None if self.time_ids is None else fn(self.time_ids),
        )

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
        def join(name: str):
            values = [getattr(p, name) for p in parts]
            return None if values[0] is None else torch.cat(values)

        return Conditioning(join("embeds"), join("pooled"), join("time_ids"))

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

    @abstractmethod
    def encode_prompt(self, pipe, prompts: list[str], resolution: tuple[int, int]) -> Conditioning:
        """Conditioning for `prompts` at image `resolution` (height, width) in pixels."""

    def denoise(self, denoiser, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return denoiser(latents, t, encoder_hidden_states=cond.embeds, return_dict=False)[0]

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
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, device=pipe.device, do_classifier_free_guidance=False
        )
        return Conditioning(embeds, pooled)

    def denoise(self, denoiser, latents, t, cond):
        return denoiser(
            hidden_states=latents,
            timestep=t,
            encoder_hidden_states=cond.embeds,
            pooled_projections=cond.pooled,
            return_dict=False,
        )[0]


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

    def _stats(self, vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (1, vae.config.z_dim, 1, 1, 1)
        mean = torch.tensor(vae.config.latents_mean, dtype=like.dtype, device=like.device).view(shape)
        std = torch.tensor(vae.config.latents_std, dtype=like.dtype, device=like.device).view(shape)
        return mean, std

    def posterior_sample(self, vae, posterior, generator):
        latents = posterior.sample(generator=generator) if generator is not None else posterior.sample()
        mean, std = self._stats(vae, latents)
        return (latents - mean) / std

    def vae_decode(self, vae, latents):
        mean, std = self._stats(vae, latents)
        return vae.decode(latents * std + mean).sample


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
    (StableDiffusionPipeline, StableDiffusionFamily),
    (WanPipeline, WanFamily),
    (AnimateDiffPipeline, AnimateDiffFamily),
)


def family_of(pipe) -> Family:
    """The family adapter for a loaded pipeline; a clear error for unsupported classes."""
    for pipeline_class, family in _FAMILIES:
        if isinstance(pipe, pipeline_class):
            return family()
    supported = ", ".join(cls.__name__ for cls, _ in _FAMILIES)
    raise ValueError(f"unsupported pipeline class {type(pipe).__name__}; mmalign trains {supported}")
