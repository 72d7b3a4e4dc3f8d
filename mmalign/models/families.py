"""Per-family glue between `DiffusionModel` and a diffusers pipeline.

A family knows three things about its pipeline class, and nothing else: how to turn prompts
into the conditioning its denoiser reads, how to call the denoiser, and which attribute holds
it. Everything else (noise, targets, sampling, LoRA, saving) is shared in `DiffusionModel`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace

import torch
from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline


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
    """Base: the denoiser attribute name, prompt encoding and the denoiser call."""

    name = "base"
    denoiser_attr = "unet"
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")

    @abstractmethod
    def encode_prompt(self, pipe, prompts: list[str], resolution: tuple[int, int]) -> Conditioning:
        """Conditioning for `prompts` at image `resolution` (height, width) in pixels."""

    def denoise(self, denoiser, latents: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        return denoiser(latents, t, encoder_hidden_states=cond.embeds, return_dict=False)[0]


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


_FAMILIES: tuple[tuple[type, type[Family]], ...] = (
    (StableDiffusionXLPipeline, StableDiffusionXLFamily),
    (StableDiffusion3Pipeline, StableDiffusion3Family),
    (StableDiffusionPipeline, StableDiffusionFamily),
)


def family_of(pipe) -> Family:
    """The family adapter for a loaded pipeline; a clear error for unsupported classes."""
    for pipeline_class, family in _FAMILIES:
        if isinstance(pipe, pipeline_class):
            return family()
    supported = ", ".join(cls.__name__ for cls, _ in _FAMILIES)
    raise ValueError(f"unsupported pipeline class {type(pipe).__name__}; mmalign trains {supported}")
