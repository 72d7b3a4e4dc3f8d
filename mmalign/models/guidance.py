"""Classifier-free guidance over a pipeline's denoiser: a mixin of `DiffusionModel`.

`guidance_conditioning` encodes the prompts and, when guidance is on, the negative prompt;
`guided_prediction` makes one batched denoiser call and combines the two halves with the family's
rule (`u + g·(c − u)`), where a two-expert pipeline (Wan 2.2 A14B) may guide its low-noise expert's
steps with `guidance_scale_2` (`guidance_scale_at`). A guidance-distilled transformer (FLUX.1-dev,
HunyuanVideo) reads the scale as an input instead, with no negative pass.

The class it mixes into provides: `pipe`, `device`, `family`, `experts` (a `TimestepExperts` or
None), `embeds_guidance`, `encode_prompt`, `_with_guidance(cond, value)` and
`denoise(denoiser, x, t, cond)`.
"""

from __future__ import annotations

import torch

from mmalign.models.families import Conditioning


class ClassifierFreeGuidance:
    """`guidance_conditioning`, `guidance_scale_at` and `guided_prediction` for the host model."""

    def guidance_conditioning(
        self,
        prompts: list[str],
        resolution: tuple[int, int],
        guidance_scale: float,
        negative_prompt: str = "",
        *,
        guidance_scale_2: float | None = None,
    ) -> tuple[Conditioning, Conditioning | None]:
        """The prompts' conditioning and, with guidance (a scale other than 1), the negative prompt's (B rows each).

        A guidance-distilled transformer (FLUX.1-dev) reads `guidance_scale` itself: no negative prompt.
        `guidance_scale_2` is the low-noise expert's scale of a two-expert pipeline (`guidance_scale_at`)."""
        self._check_guidance_scale_2(guidance_scale_2)
        cond = self.encode_prompt(prompts, resolution)
        if self.embeds_guidance:
            return self._with_guidance(cond, guidance_scale), None
        if guidance_scale == 1.0 and guidance_scale_2 in (None, 1.0):
            return cond, None
        return cond, self.encode_prompt([negative_prompt] * len(prompts), resolution)

    def _check_guidance_scale_2(self, guidance_scale_2: float | None) -> None:
        if guidance_scale_2 is not None and self.experts is None:
            raise ValueError(
                f"guidance_scale_2 guides the low-noise expert (transformer_2) of a two-expert pipeline; this "
                f"{type(self.pipe).__name__} has one denoiser"
            )

    def guidance_scale_at(
        self, t: torch.Tensor, guidance_scale: float, guidance_scale_2: float | None = None
    ) -> float | torch.Tensor:
        """The guidance scale of a step at timestep `t` (a scalar or `(B,)`, the scheduler's 0…1000 units).

        `guidance_scale`, except on a two-expert pipeline with `guidance_scale_2` set, whose steps below the
        expert boundary (those `transformer_2` denoises) take `guidance_scale_2`, as `WanPipeline` does. A
        float when every row has the same scale, else `(B,)` float32 on `t`'s device."""
        self._check_guidance_scale_2(guidance_scale_2)
        if guidance_scale_2 is None:
            return float(guidance_scale)
        low = torch.as_tensor(t) < self.experts.boundary
        if low.all() or not low.any():
            return float(guidance_scale_2 if low.all() else guidance_scale)
        return torch.where(low, float(guidance_scale_2), float(guidance_scale)).float()

    def guided_prediction(
        self,
        denoiser: torch.nn.Module,
        x: torch.Tensor,
        t: torch.Tensor,
        cond: Conditioning,
        negative: Conditioning | None,
        guidance_scale: float,
        guidance_scale_2: float | None = None,
    ) -> torch.Tensor:
        """`denoiser`'s prediction for `x (B, …)` at timestep `t` (a scalar or `(B,)`), in float32, with
        the family's classifier-free guidance (`u + g·(c − u)`, `g = guidance_scale_at(t, …)` per row) when
        `negative` is given (one batched call); a step whose scale is 1 on every row skips the negative pass."""
        scale = self.guidance_scale_at(t, guidance_scale, guidance_scale_2)
        if isinstance(scale, float) and scale == 1.0:
            negative = None  # u + 1·(c − u) = c
        x_in = x if negative is None else torch.cat([x, x])
        full = Conditioning.cat([negative, cond]) if negative is not None else cond
        t = t.to(self.device)
        t_batch = t.expand(x_in.shape[0]) if t.ndim == 0 else t.repeat(x_in.shape[0] // t.shape[0])
        pred = self.denoise(denoiser, x_in, t_batch, full)
        if negative is None:
            return pred
        uncond, text = pred.chunk(2)
        if torch.is_tensor(scale):  # one scale per row of `t`, repeated over `x`'s rows as `t` is
            scale = scale.to(uncond.device).repeat(uncond.shape[0] // scale.shape[0])
            scale = scale.view(-1, *[1] * (uncond.ndim - 1))
        return self.family.combine_guidance(uncond, text, scale)
