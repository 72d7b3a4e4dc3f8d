"""`VideoPairMethod`: what DenseDPO and RDPO share on top of `DiffusionPairMethod`.

- pairs of clips generated from real clips by noising and regenerating (`regenerate`), stored as a
  `pairs.jsonl` folder (GIF videos) with their latents (`latents.safetensors`), and read back on resume;
- each distinct prompt's text conditioning, encoded once per run when the pairs are read and kept in
  memory (on the CPU) for every training step: the text encoders are frozen and shared by the policy
  and the reference (`conditioning`);
- training items of latents with per-segment labels, and the segment-masked Diffusion-DPO loss
  (`diffusion_dpo_loss(segment_labels=…)` on `per_segment_mse` errors), plus an optional plain
  flow-matching term on a target clip (`sft_weight`);
- held-out evaluation of clips with the video rewards (`VideoEvaluator`).

Subclasses build their pairs; item keys: `index, prompt, latents_0, latents_1, labels (S,)` and,
when the method trains a supervised term on the real clip, `latents_real`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from mmalign.config import check_range, option
from mmalign.data.video import frames_to_tensor
from mmalign.losses import diffusion_dpo_loss, per_segment_mse
from mmalign.models.families import Conditioning
from mmalign.train.diffusion_method import DiffusionPairMethod
from mmalign.train.evaluation import VideoEvaluator
from mmalign.train.rng import keyed_generator
from mmalign.video.clips import ClipDataConfig, VideoPair, load_video_pairs, write_video_pairs

LATENTS_FILE = "latents.safetensors"


@dataclass
class VideoPairConfig:
    """Options every video pair method has; DenseDPO's and RDPO's configs extend it."""

    beta: float = option("β multiplying mean-reduced flow-matching errors (500 in Flow-DPO / DenseDPO)", 500.0)
    segment_seconds: float = option("segment length in seconds of the stored labels (paper: 1 s)", 1.0)
    sample_steps: int = option("sampler steps of the full schedule when building pairs", 20)
    guidance_scale: float = option("classifier-free guidance when building pairs", 3.0)
    guidance_scale_2: float | None = option(
        "two-expert models (Wan 2.2 A14B): guidance of the pair-building steps on the low-noise expert "
        "(transformer_2), as WanPipeline's guidance_scale_2; null = guidance_scale; an error on a model with one "
        "denoiser",
        None,
    )
    build_batch: int = option("clips denoised at once when building pairs", 16)
    sft_weight: float = option("weight of a plain flow-matching loss on video 0 (0 = pure DPO)", 0.0)

    def check_values(self, prefix: str) -> None:
        """Ranges, checked when the config is built (keys named under `prefix`)."""
        for key in ("beta", "segment_seconds"):
            check_range(f"{prefix}{key}", getattr(self, key), 0, open_low=True)
        for key in ("sample_steps", "build_batch"):
            check_range(f"{prefix}{key}", getattr(self, key), 1)
        check_range(f"{prefix}sft_weight", self.sft_weight, 0)


class VideoPairMethod(DiffusionPairMethod):
    """Shared video pair plumbing; its config is a `VideoPairConfig`."""

    data_config_class = ClipDataConfig
    config: VideoPairConfig

    def load_video_model(self, accelerator) -> None:
        self.load_model(accelerator)
        if not self.model.is_video:
            raise ValueError(f"{self.run.model.path} is not a video pipeline; {self.run.method} trains video models")
        #: text conditioning by (prompt, resolution), one row each, on the CPU (`conditioning`)
        self.prompt_conditioning: dict[tuple[str, tuple[int, int]], Conditioning] = {}

    # ------------------------------------------------------------------ pairs on disk
    def save_pairs(self, folder: Path, pairs: list[VideoPair], latents: dict[str, list[torch.Tensor]]) -> None:
        write_video_pairs(folder, pairs)
        save_file({k: torch.stack(v).contiguous() for k, v in latents.items()}, str(folder / LATENTS_FILE))

    def read_pairs(self, folder: Path) -> list[dict[str, Any]]:
        """Items of the pairs in `folder`; latents from `latents.safetensors`, else encoded from the videos."""
        pairs = load_video_pairs(folder, self.config.segment_seconds)
        file = folder / LATENTS_FILE
        latents = load_file(str(file)) if file.is_file() else None
        return self.pair_items(pairs, latents)

    def pair_items(self, pairs: list[VideoPair], latents: dict[str, torch.Tensor] | None) -> list[dict[str, Any]]:
        """Training items; sets the clip shape, the evaluator and the latent-frame → segment map."""
        shapes = {(p.frames_0.shape, p.fps, p.segment_seconds) for p in pairs}
        if len(shapes) != 1:
            raise ValueError(f"all pairs of a run must share frames, size, fps and segment length: {sorted(shapes)}")
        first = pairs[0]
        frame_segment, self.num_segments, _ = self.model.latent_frame_segments(
            len(first.frames_0), first.fps, first.segment_seconds
        )
        self.frame_segment = frame_segment.to(self.device)
        self.resolution = tuple(first.frames_0.shape[1:3])
        if self.evaluator is None:
            self.evaluator = VideoEvaluator(
                self.run.eval, self.model, self.resolution, len(first.frames_0), first.fps, self.device
            )
        if latents is None:
            latents = {f"latents_{k}": self.encode([getattr(p, f"frames_{k}") for p in pairs]) for k in (0, 1)}
        self.encode_prompts([p.prompt for p in pairs], self.resolution)
        items = []
        for i, pair in enumerate(pairs):
            item = {"index": i, "prompt": pair.prompt, "labels": torch.tensor(pair.labels)}
            item.update({key: value[i] for key, value in latents.items()})
            items.append(item)
        return items

    # ------------------------------------------------------------------ prompt conditioning
    def encode_prompts(self, prompts: list[str], resolution: tuple[int, int]) -> None:
        """Encode those of `prompts` not yet in `prompt_conditioning` at `resolution` (pixels), `build_batch`
        at a time, and keep each row on the CPU."""
        new = [p for p in dict.fromkeys(prompts) if (p, resolution) not in self.prompt_conditioning]
        for start in range(0, len(new), self.config.build_batch):
            chunk = new[start : start + self.config.build_batch]
            cond = self.model.encode_prompt(chunk, resolution).to(torch.device("cpu"))
            for i, prompt in enumerate(chunk):
                self.prompt_conditioning[(prompt, resolution)] = cond[i : i + 1]

    def conditioning(self, prompts: list[str], groups: int, resolution: tuple[int, int] | None = None) -> Conditioning:
        """Prompt conditioning tiled over `groups` ([p1..pB, p1..pB, …]) at `resolution` (default: the training
        resolution), from `prompt_conditioning`: each distinct prompt runs through the text encoders once per
        run. The text encoders are frozen and the reference shares them, so one encoding serves the policy's
        and the reference's predictions at every step."""
        resolution = tuple(resolution or self.resolution)
        self.encode_prompts(prompts, resolution)
        rows = [self.prompt_conditioning[(p, resolution)] for p in prompts]
        return Conditioning.cat(rows).to(self.device).tile(groups)

    # ------------------------------------------------------------------ generation
    def encode(self, clips: list[np.ndarray]) -> torch.Tensor:
        """Clips `(F, H, W, 3)` uint8 → latents `(N, C, F', h, w)` (keyed posterior samples, in batches)."""
        out, batch = [], self.config.build_batch
        for start in range(0, len(clips), batch):
            pixels = torch.stack([frames_to_tensor(f) for f in clips[start : start + batch]])
            out.append(self.model.encode_images(pixels, generator=keyed_generator(self.run.seed, start, "encode")))
        return torch.cat(out).cpu()

    @torch.no_grad()
    def regenerate(
        self, prompts: list[str], x0: torch.Tensor, depth: float, generator: torch.Generator
    ) -> torch.Tensor:
        """Noise clean latents `x0` to `depth` ∈ (0, 1] of the schedule with fresh noise and denoise them
        with the current model (SDEdit); depth 1 samples from pure noise. Returns latents like `x0`."""
        c = self.config
        noise = torch.randn(x0.shape, generator=generator)
        f = self.model.vae_scale_factor
        kwargs = {"init_latents": x0, "strength": depth} if depth < 1 else {}  # the noise sets the shape
        return self.model.sample(prompts, num_steps=c.sample_steps, guidance_scale=c.guidance_scale,
                                 guidance_scale_2=c.guidance_scale_2, noise=noise,
                                 resolution=(x0.shape[-2] * f, x0.shape[-1] * f), **kwargs)  # fmt: skip

    # ------------------------------------------------------------------ training
    def sft_target(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """Latents of the supervised term (None: video 0 of each pair)."""
        return None

    def compute_loss(self, batch: dict[str, Any], step: int, micro: int):
        index, n = batch["index"], len(batch["prompt"])
        x0 = torch.cat([batch["latents_0"], batch["latents_1"]]).to(self.device)
        x0, noise, t, x_t = self.noise_latents(x0, index, step)
        cond = self.conditioning(batch["prompt"], 2, self.resolution)
        target = self.model.noise.target(x0, noise, t)
        segments = (self.frame_segment, self.num_segments)
        err = per_segment_mse(self.model.predict(x_t, t, cond), target, *segments)
        ref = per_segment_mse(self.model.predict_reference(x_t, t, cond), target, *segments)
        labels = batch["labels"].to(self.device)
        loss, metrics = diffusion_dpo_loss(err[:n], err[n:], ref[:n], ref[n:], beta=self.config.beta,
                                           segment_labels=labels)  # fmt: skip
        metrics["tie_fraction"] = (labels == 0).float().mean()
        if self.config.sft_weight:
            real = self.sft_target(batch)
            if real is None:
                sft = err[:n].sum(1).mean()
            else:
                real = real.to(self.device)
                _, noise_r, t_r, x_r = self.noise_latents(real, index, step)
                target_r = self.model.noise.target(real, noise_r, t_r)
                sft = per_segment_mse(self.model.predict(x_r, t_r, cond[:n]), target_r, *segments).sum(1).mean()
            metrics["sft_loss"] = sft.detach()
            loss = loss + self.config.sft_weight * sft
        return loss, metrics
