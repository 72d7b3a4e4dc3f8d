"""DenseDPO (Wu et al., NeurIPS 2025): segment-level preferences on pairs made from corrupted real videos.

Pairs (`densedpo.pairs`):
- `structural` (DenseDPO, Algorithm 2): a real clip's latent is noised to level η ~ U(η_lo, η_hi)
  twice with independent noise and each copy is denoised by the current model (SDEdit), so the two
  videos share layout and motion and differ in local artifacts;
- `vanilla` (Algorithm 1, the baseline): two samples of the clip's caption from independent noise.

Labels (`densedpo.labels`): `segment` gives one label in {+1, 0, −1} per `segment_seconds` of
video (DenseDPO); `clip` gives one label per pair (VanillaDPO / StructuralDPO). The labeller is a
video `Reward` applied per segment (never the evaluation's gold metric) or a VLM judge.

Loss: `diffusion_dpo_loss(segment_labels=…)` on per-segment errors: latent frames are mapped to
segments by the majority of their pixel frames (`mmalign.data.segments`), each segment's error is
normalised by the whole clip's element count, and `z = −β Σ_s ℓ_s [(e_θ − e_ref)(w) − (e_θ − e_ref)(l)]_s`
sums inside one sigmoid. All labels +1 is exactly Diffusion-DPO on the whole clip.

Pairs are built once, on the main process, with the starting model, and stored in
`<output_dir>/pairs` (GIF videos, `pairs.jsonl` with labels, η and sources, and the latents in
`latents.safetensors`); a resumed run reads them back. `densedpo.pairs_dir` trains on pairs made
elsewhere (videos are then encoded by the model's VAE).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from mmalign.config import option
from mmalign.data.segments import pixel_segment_bounds
from mmalign.data.video import frames_to_tensor, tensor_to_frames
from mmalign.losses import diffusion_dpo_loss, per_segment_mse
from mmalign.rewards import load_reward
from mmalign.train.diffusion_method import DiffusionPairMethod
from mmalign.train.evaluation import VideoEvaluator
from mmalign.train.rng import keyed_generator
from mmalign.video.clips import VideoPair, load_clips, load_video_pairs, write_video_pairs
from mmalign.video.labels import RewardSegmentLabeler, VLMSegmentJudge, majority

LATENTS_FILE = "latents.safetensors"


@dataclass
class DenseDPOConfig:
    beta: float = option("β multiplying mean-reduced flow-matching errors (500 in Flow-DPO / DenseDPO)", 500.0)
    pairs: str = option("structural: two denoisings of a corrupted real clip; vanilla: two independent samples",
                        "structural")  # fmt: skip
    labels: str = option("segment: one label per segment (DenseDPO); clip: one label per pair", "segment")
    num_videos: int = option("real clips (structural) or captions (vanilla) to build pairs from: the label budget",
                             64)  # fmt: skip
    eta: list[float] = option("η range [lo, hi]: real clips are noised to η ~ U(lo, hi) (paper: 0.65–0.8)",
                              default_factory=lambda: [0.65, 0.8])  # fmt: skip
    segment_seconds: float = option("segment length in seconds (paper: 1 s)", 1.0)
    sample_steps: int = option("sampler steps of the full schedule when building pairs", 20)
    guidance_scale: float = option("classifier-free guidance when building pairs", 3.0)
    build_batch: int = option("clips denoised at once when building pairs", 16)
    labeler: str = option("reward: a video reward per segment; vlm: a VLM judge asked in both orders", "reward")
    labeler_reward: str = option("the labelling reward (`mmalign rewards`); never the eval gold metric",
                                 "motion-smoothness")  # fmt: skip
    labeler_args: dict[str, Any] = option("keyword arguments of the labelling reward", default_factory=dict)
    tie_margin: float = option("score differences within this margin are ties (label 0)", 0.02)
    judge_model: str | None = option("VLM judge: a hub id or folder `VisionLanguageModel` loads", None)
    pairs_dir: str | None = option("train on the pairs in this folder (pairs.jsonl) instead of building them", None)
    sft_weight: float = option("weight of a plain flow-matching loss on video 0 (0 = pure DPO)", 0.0)


class DenseDPO(DiffusionPairMethod):
    config_class = DenseDPOConfig
    config: DenseDPOConfig

    # ------------------------------------------------------------------ setup
    def setup(self, accelerator) -> None:
        c = self.config
        if c.pairs not in ("structural", "vanilla") or c.labels not in ("segment", "clip"):
            raise ValueError(f"densedpo.pairs must be structural or vanilla and densedpo.labels segment or clip, "
                             f"got {c.pairs!r} / {c.labels!r}")  # fmt: skip
        if c.labeler == "reward" and c.labeler_reward == self.run.eval.gold:
            raise ValueError(f"densedpo.labeler_reward is the eval gold metric {c.labeler_reward!r}: the gold "
                             "metric must never label training pairs")  # fmt: skip
        self.load_model(accelerator)
        if not self.model.is_video:
            raise ValueError(f"{self.run.model.path} is not a video pipeline (DenseDPO trains Wan / AnimateDiff)")
        folder = Path(c.pairs_dir) if c.pairs_dir else Path(self.run.output_dir) / "pairs"
        with accelerator.main_process_first():
            if not (folder / "pairs.jsonl").is_file():
                if c.pairs_dir:
                    raise FileNotFoundError(f"densedpo.pairs_dir: no pairs.jsonl in {folder}")
                if accelerator.is_main_process:
                    self.build_pairs(folder)
            pairs = load_video_pairs(folder, c.segment_seconds)
            latents = load_file(str(folder / LATENTS_FILE)) if (folder / LATENTS_FILE).is_file() else None
        self.dataset = self.pair_dataset(pairs, latents)
        first = pairs[0]
        self.resolution = tuple(first.frames_0.shape[1:3])
        self.evaluator = VideoEvaluator(self.run.eval, self.resolution, len(first.frames_0), first.fps, self.device)

    def pair_dataset(self, pairs: list[VideoPair], latents: dict[str, torch.Tensor] | None) -> list[dict]:
        """Training items `{index, prompt, latents_0, latents_1, labels (S,)}`; one clip shape for all."""
        shapes = {(p.frames_0.shape, p.fps, p.segment_seconds) for p in pairs}
        if len(shapes) != 1:
            raise ValueError(f"all pairs of a run must share frames, size, fps and segment length: {sorted(shapes)}")
        first = pairs[0]
        frame_segment, self.num_segments, empty = self.model.latent_frame_segments(
            len(first.frames_0), first.fps, first.segment_seconds
        )
        self.frame_segment = frame_segment.to(self.device)
        self.untrainable_segments = empty
        if latents is None:
            latents = {f"latents_{k}": self.encode([getattr(p, f"frames_{k}") for p in pairs]) for k in (0, 1)}
        return [{"index": i, "prompt": p.prompt, "latents_0": latents["latents_0"][i],
                 "latents_1": latents["latents_1"][i], "labels": torch.tensor(p.labels)}
                for i, p in enumerate(pairs)]  # fmt: skip

    def encode(self, clips: list[np.ndarray]) -> torch.Tensor:
        """Clips `(F, H, W, 3)` uint8 → latents `(N, C, F', h, w)` (keyed posterior samples, in batches)."""
        out = []
        for start in range(0, len(clips), self.config.build_batch):
            pixels = torch.stack([frames_to_tensor(f) for f in clips[start : start + self.config.build_batch]])
            out.append(self.model.encode_images(pixels, generator=keyed_generator(self.run.seed, start, "encode")))
        return torch.cat(out).cpu()

    # ------------------------------------------------------------------ pair construction
    def labeller(self):
        c = self.config
        if c.labeler == "reward":
            reward = load_reward(c.labeler_reward, **{"device": self.device, **c.labeler_args})
            return RewardSegmentLabeler(reward, c.tie_margin)
        if c.labeler == "vlm":
            if not c.judge_model:
                raise ValueError("densedpo.labeler: vlm needs densedpo.judge_model (a VLM hub id or folder)")
            from mmalign.models.vlm import VisionLanguageModel

            return VLMSegmentJudge(VisionLanguageModel.from_pretrained(c.judge_model, device=self.device))
        raise ValueError(f"densedpo.labeler must be reward or vlm, got {c.labeler!r}")

    def build_pairs(self, folder: Path) -> None:
        """Generate `num_videos` pairs with the starting model, label them and store them in `folder`."""
        c = self.config
        clips = load_clips(self.run.data.path, c.num_videos, self.run.seed)
        labeller = self.labeller()
        source = c.labeler_reward if c.labeler == "reward" else c.judge_model
        pairs, kept = [], {"latents_0": [], "latents_1": []}
        for start in tqdm(range(0, len(clips), c.build_batch), desc="building pairs", leave=False):
            batch = clips[start : start + c.build_batch]
            prompts, fps = [clip.prompt for clip in batch], batch[0].fps
            x0 = self.encode([clip.frames for clip in batch]).to(self.device)
            rng = np.random.default_rng([self.run.seed, start])
            eta = float(rng.uniform(*c.eta)) if c.pairs == "structural" else 1.0
            generators = [keyed_generator(self.run.seed, start, f"pair{k}") for k in (0, 1)]
            latents = [self.denoise(prompts, x0, eta, g) for g in generators]
            videos = [self.model.decode_latents(z) for z in latents]
            if c.labels == "segment":
                labels = labeller(videos[0], videos[1], prompts, fps, c.segment_seconds)
            else:
                if isinstance(labeller, RewardSegmentLabeler):
                    clip = labeller.clip_labels(videos[0], videos[1], prompts)
                else:
                    clip = majority(labeller(videos[0], videos[1], prompts, fps, c.segment_seconds))
                segments = len(pixel_segment_bounds(videos[0].shape[2], fps, c.segment_seconds))
                labels = clip[:, None].expand(-1, segments)
            for i, clip in enumerate(batch):
                if not labels[i].any():
                    continue  # all ties: nothing to learn (the paper drops these pairs)
                meta = {"eta": eta, "source": clip.source, "pair_kind": c.pairs, "label_source": source}
                frames = [tensor_to_frames(v[i]) for v in videos]
                pairs.append(VideoPair(clip.prompt, *frames, fps, c.segment_seconds, labels[i].tolist(), meta))
                kept["latents_0"].append(latents[0][i].cpu())
                kept["latents_1"].append(latents[1][i].cpu())
        if not pairs:
            raise RuntimeError("every built pair was a tie on every segment; lower densedpo.tie_margin")
        write_video_pairs(folder, pairs)
        save_file({k: torch.stack(v).contiguous() for k, v in kept.items()}, str(folder / LATENTS_FILE))

    def denoise(self, prompts: list[str], x0: torch.Tensor, eta: float, generator: torch.Generator) -> torch.Tensor:
        """SDEdit from level η with fresh noise (structural), or a sample from pure noise (vanilla)."""
        c = self.config
        noise = torch.randn(x0.shape, generator=generator)
        kwargs = {"init_latents": x0, "strength": eta} if c.pairs == "structural" else {}
        return self.model.sample(prompts, num_steps=c.sample_steps, guidance_scale=c.guidance_scale, noise=noise,
                                 resolution=(x0.shape[-2] * self.model.vae_scale_factor,
                                             x0.shape[-1] * self.model.vae_scale_factor), **kwargs)  # fmt: skip

    # ------------------------------------------------------------------ training
    def collate(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "index": torch.tensor([it["index"] for it in items]),
            "prompt": [it["prompt"] for it in items],
            "latents_0": torch.stack([it["latents_0"] for it in items]),
            "latents_1": torch.stack([it["latents_1"] for it in items]),
            "labels": torch.stack([it["labels"] for it in items]),
        }

    def compute_loss(self, batch: dict[str, Any], step: int, micro: int):
        index, n = batch["index"], len(batch["prompt"])
        x0 = torch.cat([batch["latents_0"], batch["latents_1"]]).to(self.device)
        x0, noise, t, x_t = self.noise_latents(x0, index, step)
        cond = self.conditioning(batch["prompt"], 2, self.resolution)
        target = self.model.noise.target(x0, noise, t)
        err = per_segment_mse(self.model.predict(x_t, t, cond), target, self.frame_segment, self.num_segments)
        ref = per_segment_mse(self.model.predict_reference(x_t, t, cond), target, self.frame_segment, self.num_segments)
        labels = batch["labels"].to(self.device)
        loss, metrics = diffusion_dpo_loss(err[:n], err[n:], ref[:n], ref[n:], beta=self.config.beta,
                                           segment_labels=labels)  # fmt: skip
        metrics["tie_fraction"] = (labels == 0).float().mean()
        if self.config.sft_weight:
            loss = loss + self.config.sft_weight * err[:n].sum(1).mean()
        return loss, metrics

