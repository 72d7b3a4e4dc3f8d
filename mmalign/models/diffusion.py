"""`DiffusionModel`: one wrapper over diffusers text-to-image pipelines for training and sampling.

It holds a loaded pipeline and gives the pieces every preference method needs:

- `encode_prompt(prompts) -> Conditioning`, `encode_images(pixels) -> latents`,
  `decode_latents(latents) -> pixels` (images: pixels `(B, 3, H, W)`, latents `(B, C, h, w)`;
  video: pixels `(B, 3, T, H, W)`, latents `(B, C, F, h, w)`, `F = latent_frame_count(T)`);
- `noise` (the family's training noise process: timesteps, `add_noise`, `target`);
- `predict(x_t, t, cond)` with the trainable denoiser and `predict_reference(...)` with the
  frozen reference (LoRA adapters disabled, or a frozen copy for full fine-tuning);
- `sample(prompts, …)` with classifier-free guidance (`mmalign.models.guidance`; on a two-expert
  pipeline, `guidance_scale_2` on the low-noise expert's steps), optionally starting from a clean
  latent noised part of the way (SDEdit-style, `strength < 1`);
- `sample_trajectory(prompts, kernel=…)` recording every step and the log-probabilities of the
  stochastic steps, and `transition(x, x_next, step, …)` recomputing one step's log-probability
  with gradients (online RL; `mmalign.models.trajectory_sampling`);
- `save_lora(dir)` (loads with `pipe.load_lora_weights(dir)`) and `save_pretrained(dir)`
  (`mmalign.models.saving`).

A pipeline with two experts split by timestep (Wan 2.2 A14B: `transformer`, `transformer_2`,
`boundary_ratio`) trains both as one denoiser (`mmalign.models.experts`).

Families: SD1.x/2.x UNets (ε or v prediction), SDXL (two text encoders, time ids), SD3-class
flow-matching transformers (SD3, SD3.5), FLUX.1 (packed latents, guidance embedding on dev) and
Qwen-Image (packed latents, Qwen2.5-VL text states), and for video Wan-class flow-matching 3D
transformers (causal VAE, 4× in time; Wan 2.2's two experts), HunyuanVideo (guidance-distilled)
and AnimateDiff motion UNets (per-frame VAE). See `mmalign.models.families`.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from peft import LoraConfig

from mmalign.data.segments import latent_frame_segments
from mmalign.models.experts import TimestepExperts, timestep_experts
from mmalign.models.families import Conditioning, Family, family_of
from mmalign.models.guidance import ClassifierFreeGuidance
from mmalign.models.inversion import renoise_invert
from mmalign.models.noise import noise_process
from mmalign.models.saving import PipelineSaving
from mmalign.models.state import load_trainable_state, trainable_state
from mmalign.models.trajectory_sampling import TrajectorySampling
from mmalign.models.weights import reading_weights, use_safetensors
from mmalign.registry import resolve_model_path

#: where `offload_frozen` keeps the text encoders and the autoencoder between uses
OFFLOAD_DEVICE = torch.device("cpu")


def load_pipeline(
    path: str | Path,
    torch_dtype: torch.dtype | None = None,
    variant: str | None = None,
    revision: str | None = None,
    allow_pickle: bool = False,
) -> DiffusionPipeline:
    """`DiffusionPipeline.from_pretrained` that also loads pipelines saved with empty components.

    Components recorded as `[null, null]` in `model_index.json` (an SD3 pipeline without T5, an
    SD pipeline without safety checker) are passed as `None` explicitly, which diffusers requires.
    Weights are read from safetensors only unless `allow_pickle` (`mmalign.models.weights`).
    """
    path = resolve_model_path(str(path))
    index = DiffusionPipeline.load_config(path, revision=revision)
    empty = {name: None for name, value in index.items() if isinstance(value, list) and value[0] is None}
    if "safety_checker" in index:
        empty.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with reading_weights(path, allow_pickle):
        pipe = DiffusionPipeline.from_pretrained(
            path,
            dtype=torch_dtype,
            variant=variant,
            revision=revision,
            use_safetensors=use_safetensors(allow_pickle),
            **empty,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


class DiffusionModel(ClassifierFreeGuidance, TrajectorySampling, PipelineSaving):
    """A diffusers pipeline with a trainable denoiser (LoRA by default) and a frozen reference.

    Args:
        pipe: a loaded pipeline of a supported family.
        lora_rank: LoRA rank on the denoiser's attention projections; `None` trains every
            denoiser weight (full fine-tuning) and keeps a frozen copy as the reference.
        lora_alpha: LoRA scaling numerator (default: equal to the rank, as the DPO papers use).
        lora_targets: module names to adapt (default: the family's attention projections).
        reference: keep a reference (adapters off / frozen copy); not needed for SFT.
        weight_dtype: dtype of the frozen weights (text encoders, the reference, the base under LoRA);
            trainable weights stay float32, and with a half-precision `weight_dtype` every denoiser call
            runs under `torch.autocast` in it. The autoencoder stays float32.
        flow_sampling: σ law for flow-matching families, `logit_normal` or `uniform`.
        gradient_checkpointing: recompute the denoiser's activations in backward instead of storing them.
        offload_frozen: keep the text encoders and the autoencoder on the CPU; `to(device)` moves only the
            denoiser (and the reference copy), and each frozen component moves onto that device only while
            `encode_prompt`, `encode_images` or `decode_latents` uses it.
        embedded_guidance: the guidance value a guidance-distilled transformer (FLUX.1-dev,
            HunyuanVideo) reads in training predictions (`encode_prompt`); sampling reads
            `guidance_scale`. None = the family's default (3.5 for FLUX.1-dev, as its model card
            samples; 6 for HunyuanVideo, its pipeline's default); an error for a model without a
            guidance input.
    """

    def __init__(
        self,
        pipe: DiffusionPipeline,
        *,
        lora_rank: int | None = 8,
        lora_alpha: int | None = None,
        lora_targets: tuple[str, ...] | None = None,
        reference: bool = True,
        weight_dtype: torch.dtype = torch.float32,
        flow_sampling: str = "logit_normal",
        gradient_checkpointing: bool = False,
        embedded_guidance: float | None = None,
        offload_frozen: bool = False,
    ):
        self.pipe = pipe
        self.offload_frozen = offload_frozen
        self.family: Family = family_of(pipe)
        self.experts: TimestepExperts | None = timestep_experts(pipe)
        if embedded_guidance is not None and not self.embeds_guidance:
            name = type(pipe).__name__
            raise ValueError(f"embedded_guidance is for guidance-distilled transformers; this {name} reads none")
        default = self.family.default_embedded_guidance
        self.embedded_guidance = default if embedded_guidance is None else float(embedded_guidance)
        self.noise = noise_process(pipe.scheduler, flow_sampling=flow_sampling)
        self.weight_dtype = weight_dtype
        for name, component in pipe.components.items():
            if isinstance(component, torch.nn.Module):
                component.requires_grad_(False).eval()
                # the autoencoder stays in float32 (SDXL's overflows in fp16); it is small
                dtype = torch.float32 if name == "vae" else weight_dtype
                if next(component.parameters()).dtype != dtype:
                    component.to(dtype=dtype)
        denoiser = self.base_denoiser
        self.lora_rank = lora_rank
        if lora_rank is not None:
            targets = list(lora_targets or self.family.lora_targets)
            excluded = self.family.lora_excluded if any(t.startswith("proj_") for t in targets) else None
            denoiser.add_adapter(
                LoraConfig(
                    r=lora_rank,
                    lora_alpha=lora_alpha or lora_rank,
                    init_lora_weights="gaussian",
                    target_modules=targets,
                    exclude_modules=excluded,
                )
            )
            self.reference_denoiser = None
        else:
            denoiser.requires_grad_(True)
            self.reference_denoiser = copy.deepcopy(denoiser).requires_grad_(False) if reference else None
        for p in denoiser.parameters():
            if p.requires_grad:
                p.data = p.data.float()
        if gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        denoiser.train()
        self.denoiser: torch.nn.Module = denoiser  # the trainer may replace it with a DDP wrapper

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        torch_dtype: torch.dtype | None = None,
        variant: str | None = None,
        revision: str | None = None,
        allow_pickle: bool = False,
        **kwargs,
    ) -> DiffusionModel:
        """Load a Hub id, a local diffusers folder or `embedded:<name>`; kwargs go to `__init__`."""
        dtype = torch.float32 if torch_dtype is None else torch_dtype
        pipe = load_pipeline(path, torch_dtype=dtype, variant=variant, revision=revision, allow_pickle=allow_pickle)
        return cls(pipe, weight_dtype=dtype, **kwargs)

    # ------------------------------------------------------------------ properties
    @property
    def base_denoiser(self) -> torch.nn.Module:
        """The unwrapped denoiser module held by the pipeline (`unet` or `transformer`), or both experts
        of a two-expert pipeline as one `TimestepExperts` module."""
        return self.experts if self.experts is not None else getattr(self.pipe, self.family.denoiser_attr)

    def denoiser_components(self) -> dict[str, torch.nn.Module]:
        """The pipeline's trainable denoiser component(s) by attribute: one, or Wan 2.2's two experts."""
        if self.experts is not None:
            return self.experts.experts
        return {self.family.denoiser_attr: self.base_denoiser}

    @property
    def device(self) -> torch.device:
        return next(self.base_denoiser.parameters()).device

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along height and width."""
        return self.family.spatial_compression(self.pipe.vae)

    @property
    def embeds_guidance(self) -> bool:
        """Whether the denoiser reads the guidance value itself (guidance-distilled: FLUX.1-dev)."""
        return self.family.embeds_guidance(self.base_denoiser)

    @property
    def is_video(self) -> bool:
        return self.family.is_video

    @property
    def default_resolution(self) -> tuple[int, int]:
        """(height, width) in pixels: the denoiser's `sample_size`, else the pipeline's call defaults, else
        its `default_sample_size` in latent cells (FLUX.1, Qwen-Image)."""
        size = self.base_denoiser.config.get("sample_size")
        if size is not None:
            size = int(size) * self.vae_scale_factor
            return size, size
        defaults = inspect.signature(type(self.pipe).__call__).parameters
        height, width = defaults["height"].default, defaults["width"].default
        if height is None or width is None:
            size = int(self.pipe.default_sample_size) * self.vae_scale_factor
            return size, size
        return int(height), int(width)

    @property
    def default_num_frames(self) -> int:
        """Pixel frames a video pipeline makes by default (its `num_frames` call default); 1 for images."""
        if not self.is_video:
            return 1
        return int(inspect.signature(type(self.pipe).__call__).parameters["num_frames"].default)

    def latent_frame_count(
        self, pixel_frames: int | None = None, *, seconds: float | None = None, fps: float | None = None
    ) -> int:
        """Latent frames the autoencoder makes of a clip given as `pixel_frames`, or `seconds` at `fps`.

        Wan-class causal VAEs: `1 + (T − 1)/4` (T must be 1 + 4n); per-frame VAEs: T; images: 1.
        """
        if pixel_frames is None:
            if seconds is None or fps is None:
                raise ValueError("give pixel_frames, or both seconds and fps")
            pixel_frames = round(seconds * fps)
            if self.family.causal_time:  # as WanPipeline rounds num_frames: T // k · k + 1
                k = self.family.temporal_compression(self.pipe.vae)
                pixel_frames = pixel_frames // k * k + 1
        if pixel_frames < 1:
            raise ValueError(f"a clip needs at least one frame, got {pixel_frames}")
        if not self.is_video:
            return 1
        return self.family.latent_frame_count(self.pipe.vae, pixel_frames)

    @property
    def text_encoder_names(self) -> list[str]:
        """The pipeline's text-encoder components (`text_encoder`, `text_encoder_2`, …) that are present."""
        return [
            name
            for name, component in self.pipe.components.items()
            if name.startswith("text_encoder") and isinstance(component, torch.nn.Module)
        ]

    def to(self, device: torch.device | str) -> DiffusionModel:
        """Move the pipeline to `device`; with `offload_frozen`, the denoiser only (the rest stays on the CPU)."""
        if self.offload_frozen:
            self.base_denoiser.to(device)
            for name in (*self.text_encoder_names, "vae"):
                getattr(self.pipe, name).to(OFFLOAD_DEVICE)
        else:
            self.pipe.to(device)
        if self.reference_denoiser is not None:
            self.reference_denoiser.to(device)
        return self

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.base_denoiser.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable weights by name (LoRA matrices, or the whole denoiser), detached on CPU."""
        return trainable_state(self.base_denoiser)

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_trainable_state(self.base_denoiser, state)

    def latent_frame_segments(
        self, pixel_frames: int, fps: float | None, segment_seconds: float, where: str = "video"
    ) -> tuple[torch.Tensor, int, list[int]]:
        """Segment index of each latent frame of a `pixel_frames` clip cut every `segment_seconds` at
        `fps`, the segment count and the segments no latent frame carries (`mmalign.data.segments`)."""
        return latent_frame_segments(
            pixel_frames, self.latent_frame_count(pixel_frames), fps, segment_seconds,
            self.family.temporal_compression(self.pipe.vae), self.family.causal_time, where,
        )  # fmt: skip

    # ------------------------------------------------------------------ encoders
    @contextmanager
    def frozen_on_device(self, *names: str):
        """With `offload_frozen`, move the named frozen components onto the denoiser's device for the block
        and back to the CPU after it (also on error); without it, do nothing."""
        if not self.offload_frozen:
            yield
            return
        modules = [getattr(self.pipe, name) for name in names]
        for module in modules:
            module.to(self.device)
        try:
            yield
        finally:
            for module in modules:
                module.to(OFFLOAD_DEVICE)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], resolution: tuple[int, int] | None = None) -> Conditioning:
        """Text conditioning for `prompts` (frozen text encoders, no graph); a guidance-distilled
        transformer's rows read `embedded_guidance`."""
        with self.frozen_on_device(*self.text_encoder_names):
            cond = self.family.encode_prompt(self.pipe, list(prompts), resolution or self.default_resolution)
        return self._with_guidance(cond, self.embedded_guidance)

    def _with_guidance(self, cond: Conditioning, value: float) -> Conditioning:
        """`cond` with the guidance value `value` on every row, for a transformer that reads one."""
        if not self.embeds_guidance:
            return cond
        return replace(cond, guidance=torch.full((cond.embeds.shape[0],), float(value), device=cond.embeds.device))

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels in [-1, 1] → normalised latents (a posterior sample).

        Images: `(B, 3, H, W)` → `(B, C, H/f, W/f)`; video: `(B, 3, T, H, W)` → `(B, C, F, H/f, W/f)`.
        """
        expected = 5 if self.is_video else 4
        if pixels.ndim != expected:
            layout = "(B, 3, T, H, W)" if self.is_video else "(B, 3, H, W)"
            raise ValueError(f"{self.family.name} encodes pixels {layout}, got shape {tuple(pixels.shape)}")
        with self.frozen_on_device("vae"):
            return self.family.vae_encode(self.pipe.vae, pixels.to(self.device, torch.float32), generator)

    @torch.no_grad()
    def encode_posterior(self, pixels: torch.Tensor) -> torch.Tensor:
        """Images `(B, 3, H, W)` in [-1, 1] → the autoencoder's posterior `(B, 2C, H/f, W/f)`: mean and
        log-variance along channels (diffusers' `DiagonalGaussianDistribution.parameters`), unnormalised.
        `sample_posterior(encode_posterior(x), g)` equals `encode_images(x, g)`."""
        if self.is_video or type(self.family).vae_encode is not Family.vae_encode:
            raise ValueError(f"the {self.family.name} family encodes its own way, not one posterior per image")
        if pixels.ndim != 4:
            raise ValueError(f"encode_posterior takes images (B, 3, H, W), got shape {tuple(pixels.shape)}")
        with self.frozen_on_device("vae"):
            return self.pipe.vae.encode(pixels.to(self.device, torch.float32)).latent_dist.parameters

    @torch.no_grad()
    def sample_posterior(
        self, parameters: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None
    ) -> torch.Tensor:
        """Normalised latents `(B, C, h, w)` drawn from posteriors `(B, 2C, h, w)` that `encode_posterior` gave."""
        posterior = DiagonalGaussianDistribution(parameters.to(self.device, torch.float32))
        return self.family.posterior_sample(self.pipe.vae, posterior, generator)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents → pixels in [0, 1]: `(B, 3, H, W)` images or `(B, 3, T, H, W)` video."""
        with self.frozen_on_device("vae"):
            pixels = self.family.vae_decode(self.pipe.vae, latents.to(self.device, torch.float32))
        return ((pixels.float() + 1) / 2).clamp(0, 1)

    # ------------------------------------------------------------------ prediction
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The trainable denoiser's prediction (ε, v or flow velocity), in float32, with its graph."""
        return self.denoise(self.denoiser, x_t, t.to(self.device), cond)

    def denoise(self, denoiser: torch.nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """`denoiser`'s output for `x (B, …)` at timesteps `t (B,)`, in float32: the input is cast to the
        frozen weights' dtype and, when that is half precision, the call runs under `torch.autocast` in it
        (float32 trainable weights meet half-precision frozen ones)."""
        if self.weight_dtype == torch.float32:
            return self.family.denoise(denoiser, x, t, cond).float()
        with torch.autocast(self.device.type, dtype=self.weight_dtype):
            return self.family.denoise(denoiser, x.to(self.weight_dtype), t, cond).float()

    def noise_estimator(self, cond: Conditioning) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """`(z, t) ↦ ε̂`: the trainable denoiser's noise estimate under `cond`, without guidance."""

        def estimate_noise(z: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
            return self.noise.predicted_noise(z, self.predict(z, level, cond), level)

        return estimate_noise

    @torch.no_grad()
    def invert(
        self,
        x0: torch.Tensor,
        t: torch.Tensor,
        cond: Conditioning,
        *,
        steps: int = 5,
        renoise_iterations: int = 1,
        average_window: tuple[int, int] = (0, 2),
        official_grid: bool = False,
    ) -> torch.Tensor:
        """ReNoise inversion of clean latents `x0 (B, …)` to levels `t (B,)` with the trainable
        denoiser (no guidance, no graph); see `mmalign.models.inversion.renoise_invert`."""
        return renoise_invert(
            self.noise_estimator(cond),
            self.noise,
            x0,
            t,
            steps=steps,
            renoise_iterations=renoise_iterations,
            average_window=average_window,
            official_grid=official_grid,
        )

    @torch.no_grad()
    def predict_reference(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The frozen reference's prediction on the same inputs, without a graph."""
        with self.reference() as denoiser:
            return self.denoise(denoiser, x_t, t.to(self.device), cond)

    @contextmanager
    def reference(self):
        """Yield the reference denoiser: a frozen copy, or the base with LoRA adapters disabled."""
        if self.reference_denoiser is not None:
            yield self.reference_denoiser
            return
        if self.lora_rank is None:
            raise RuntimeError("this model was built with reference=False and has no reference")
        base = self.base_denoiser
        base.disable_adapters()
        try:
            yield base
        finally:
            base.enable_adapters()

    # ------------------------------------------------------------------ sampling
    def latent_shape(self, batch: int, resolution: tuple[int, int], num_frames: int | None = None) -> tuple[int, ...]:
        """`(B, C, h, w)`, or `(B, C, F, h, w)` for video with `num_frames` pixel frames (default: the pipeline's)."""
        channels = self.family.latent_channels(self.base_denoiser)
        f = self.vae_scale_factor
        spatial = (resolution[0] // f, resolution[1] // f)
        if not self.is_video:
            return batch, channels, *spatial
        return batch, channels, self.latent_frame_count(num_frames or self.default_num_frames), *spatial

    @torch.no_grad()
    def sample(
        self,
        prompts: list[str],
        *,
        num_steps: int = 20,
        guidance_scale: float = 3.0,
        guidance_scale_2: float | None = None,
        generator: torch.Generator | None = None,
        resolution: tuple[int, int] | None = None,
        num_frames: int | None = None,
        noise: torch.Tensor | None = None,
        init_latents: torch.Tensor | None = None,
        strength: float = 1.0,
        negative_prompt: str = "",
        use_reference: bool = False,
    ) -> torch.Tensor:
        """Denoise from pure noise, or from `init_latents` noised to `strength`, to clean latents.

        `strength` ∈ (0, 1] is the fraction of the `num_steps` schedule that is run (SDEdit):
        1 starts from pure noise, 0.5 noises `init_latents` to the schedule's midpoint. Noise
        comes from `generator` (CPU) unless `noise` is given. Video pipelines make `num_frames`
        pixel frames' worth of latents (default: the pipeline's). Returns latents in the same layout.
        On a two-expert pipeline the steps on the low-noise expert are guided by `guidance_scale_2`
        (None: `guidance_scale`), as `WanPipeline(guidance_scale=…, guidance_scale_2=…)` guides them.
        """
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}")
        resolution = resolution or self.default_resolution
        batch = len(prompts)
        scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        if init_latents is not None:
            shape = tuple(init_latents.shape)
        else:
            shape = self.latent_shape(batch, resolution, num_frames)
        self._set_timesteps(scheduler, num_steps, shape)
        timesteps = scheduler.timesteps
        if noise is None:
            noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        noise = noise.to(self.device, torch.float32)
        if init_latents is None:
            x = noise * getattr(scheduler, "init_noise_sigma", 1.0)
        else:
            start = self._sdedit_start_index(num_steps, strength)
            timesteps = timesteps[start:]
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(start)
            t0 = timesteps[:1].expand(batch)
            x = self.noise.add_noise(init_latents.to(self.device, torch.float32), noise, t0)
        cond, negative = self.guidance_conditioning(
            prompts, resolution, guidance_scale, negative_prompt, guidance_scale_2=guidance_scale_2
        )
        step_kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
        with self._denoiser_for_sampling(use_reference) as denoiser:
            for t in timesteps:
                x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
                pred = self.guided_prediction(denoiser, x_in, t, cond, negative, guidance_scale, guidance_scale_2)
                x = scheduler.step(pred, t, x, **step_kwargs).prev_sample
        return x

    @staticmethod
    def _sdedit_start_index(num_steps: int, strength: float) -> int:
        return num_steps - max(1, round(num_steps * strength))

    def sdedit_start(self, num_steps: int, strength: float, shape: tuple[int, ...]) -> torch.Tensor:
        """The timestep `sample(num_steps=…, strength=…)` starts denoising from, for latents of `shape`."""
        scheduler = type(self.pipe.scheduler).from_config(self.pipe.scheduler.config)
        self._set_timesteps(scheduler, num_steps, shape)
        return scheduler.timesteps[self._sdedit_start_index(num_steps, strength)]

    def noise_for(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise ε with `noise.add_noise(x0, ε, t) = x_t` (both processes are linear in ε): how a
        latent found by inversion is handed to `sample(init_latents=x0, noise=ε, strength=…)`."""
        offset = self.noise.add_noise(x0, torch.zeros_like(x0), t)
        scale = self.noise.add_noise(torch.zeros_like(x0), torch.ones_like(x0), t)
        return (x_t - offset) / scale

    @contextmanager
    def _denoiser_for_sampling(self, use_reference: bool):
        if use_reference:
            with self.reference() as denoiser:
                yield denoiser
            return
        denoiser = self.base_denoiser
        was_training = denoiser.training
        denoiser.eval()
        try:
            yield denoiser
        finally:
            denoiser.train(was_training)

    def _set_timesteps(self, scheduler, num_steps: int, shape: tuple[int, ...]) -> None:
        """Set `scheduler` to `num_steps` steps for latents of `shape` as the family's pipeline does: its
        own σ grid if it has one, shifted by `mu` from the image token count where the scheduler
        shifts by resolution (FLUX.1, Qwen-Image; SD3-class with `use_dynamic_shifting`)."""
        kwargs = {}
        config = scheduler.config
        if config.get("use_dynamic_shifting", False):
            seq_len = self.family.image_tokens(self.base_denoiser, shape)
            base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
            base_shift, max_shift = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
            slope = (max_shift - base_shift) / (max_len - base_len)
            kwargs["mu"] = base_shift + slope * (seq_len - base_len)
        sigmas = self.family.inference_sigmas(num_steps)
        if sigmas is not None and not config.get("use_flow_sigmas", False):
            scheduler.set_timesteps(sigmas=sigmas, device=self.device, **kwargs)
        else:
            scheduler.set_timesteps(num_steps, device=self.device, **kwargs)

    def generate(self, prompts: list[str], **sample_kwargs) -> torch.Tensor:
        """`sample` then `decode_latents`: images `(B, 3, H, W)` in [0, 1]."""
        return self.decode_latents(self.sample(prompts, **sample_kwargs))

    # ------------------------------------------------------------------ the Policy part (mmalign.train.method)
    def trainable_module(self) -> torch.nn.Module:
        return self.base_denoiser
