"""DenseDPO (Wu et al., NeurIPS 2025): segment-level preferences on pairs made from corrupted real videos.

Pairs (`densedpo.pairs`):
- `structural` (DenseDPO, Algorithm 2): a real clip's latent is noised to level η ~ U(η_lo, η_hi)
  twice with independent noise and each copy is denoised by the current model (SDEdit), so the two
  videos share layout and motion and differ in local artifacts;
- `vanilla` (Algorithm 1, the baseline): two samples of the clip's caption from independent noise.

Labels (`densedpo.labels`): `segment` gives one label in {+1, 0, −1} per `segment_seconds` of
video (DenseDPO); `clip` gives one label per pair (VanillaDPO / StructuralDPO). The labeller
(`densedpo.labeler`) is a video `Reward` applied per segment (never the evaluation's gold metric),
a VLM judge, or, for structural pairs, fidelity of each copy's motion to the real clip
(`reference`, ours: `mmalign.video.labels.ReferenceTrackLabeler`).

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
from tqdm.auto import tqdm

from mmalign.config import ConfigError, check_choice, check_range, option
from mmalign.data.segments import pixel_segment_bounds
from mmalign.data.video import frames_to_tensor, tensor_to_frames
from mmalign.rewards import load_reward
from mmalign.train.rng import keyed_generator
from mmalign.video.clips import VideoPair, load_clips
from mmalign.video.labels import ReferenceTrackLabeler, RewardSegmentLabeler, VLMSegmentJudge, majority
from mmalign.video.pair_method import VideoPairConfig, VideoPairMethod


@dataclass
class DenseDPOConfig(VideoPairConfig):
    pairs: str = option("structural: two denoisings of a corrupted real clip; vanilla: two independent samples",
                        "structural")  # fmt: skip
    labels: str = option("segment: one label per segment (DenseDPO); clip: one label per pair", "segment")
    num_videos: int = option("real clips (structural) or captions (vanilla) to build pairs from: the label budget",
                             64)  # fmt: skip
    eta: list[float] = option("η range [lo, hi]: real clips are noised to η ~ U(lo, hi) (paper: 0.65–0.8)",
                              default_factory=lambda: [0.65, 0.8])  # fmt: skip
    labeler: str = option(
        "reward: a video reward per segment; vlm: a VLM judge asked in both orders; reference (structural pairs): "
        "the copy whose motion is closer to the real clip's wins [ours]",
        "reward",
    )
    labeler_reward: str = option("the labelling reward (`mmalign rewards`); never the eval gold metric",
                                 "motion-smoothness")  # fmt: skip
    labeler_args: dict[str, Any] = option("keyword arguments of the labelling reward or of the reference labeller",
                                          default_factory=dict)  # fmt: skip
    tie_margin: float = option("score differences within this margin are ties (label 0)", 0.02)
    judge_model: str | None = option("VLM judge: a hub id or folder `VisionLanguageModel` loads", None)
    pairs_dir: str | None = option("train on the pairs in this folder (pairs.jsonl) instead of building them", None)
    sft_target: str = option(
        "target of the `sft_weight` term: video0 (one of the two denoised copies) or real (structural pairs: the "
        "real clip the pair was made from) [ours: the paper has no supervised term]",
        "video0",
    )

    def check_values(self, prefix: str) -> None:
        super().check_values(prefix)
        check_choice(f"{prefix}pairs", self.pairs, ("structural", "vanilla"))
        check_choice(f"{prefix}labels", self.labels, ("segment", "clip"))
        check_choice(f"{prefix}labeler", self.labeler, ("reward", "vlm", "reference"))
        check_choice(f"{prefix}sft_target", self.sft_target, ("video0", "real"))
        if self.sft_target == "real" and self.pairs != "structural":
            raise ConfigError(f"{prefix}sft_target=real needs structural pairs (the real clip each was made from), "
                              f"got {prefix}pairs={self.pairs}")  # fmt: skip
        if self.labeler == "reference" and self.pairs != "structural":
            raise ConfigError(f"{prefix}labeler=reference compares each copy with the real clip it was denoised "
                              f"from: it needs structural pairs, got {prefix}pairs={self.pairs}")  # fmt: skip
        if self.labeler == "vlm" and not self.judge_model:
            raise ConfigError(f"{prefix}labeler=vlm needs {prefix}judge_model (a VLM hub id or folder)")
        check_range(f"{prefix}num_videos", self.num_videos, 1)
        if len(self.eta) != 2 or not 0 < self.eta[0] <= self.eta[1] < 1:
            raise ConfigError(f"config key '{prefix}eta' must be [lo, hi] with 0 < lo ≤ hi < 1, got {self.eta}")
        check_range(f"{prefix}tie_margin", self.tie_margin, 0)


class DenseDPO(VideoPairMethod):
    config_class = DenseDPOConfig
    config: DenseDPOConfig

    # ------------------------------------------------------------------ setup
    def setup(self, accelerator) -> None:
        c = self.config
        if c.labeler == "reward" and c.labeler_reward == self.run.eval.gold:
            raise ConfigError(f"densedpo.labeler_reward is the eval gold metric {c.labeler_reward!r}: the gold "
                             "metric must never label training pairs")  # fmt: skip
        self.load_video_model(accelerator)
        folder = Path(c.pairs_dir) if c.pairs_dir else Path(self.run.output_dir) / "pairs"
        with accelerator.main_process_first():
            if not (folder / "pairs.jsonl").is_file():
                if c.pairs_dir:
                    raise FileNotFoundError(f"densedpo.pairs_dir: no pairs.jsonl in {folder}")
                if accelerator.is_main_process:
                    self.build_pairs(folder)
            self.dataset = self.read_pairs(folder)

    def sft_target(self, batch: dict[str, Any]) -> torch.Tensor | None:
        if self.config.sft_target == "video0":
            return None
        if "latents_real" not in batch:
            raise ConfigError("densedpo.sft_target=real needs pairs stored with their real clips' latents "
                             "(structural pairs built by this version)")  # fmt: skip
        return batch["latents_real"]

    # ------------------------------------------------------------------ pair construction
    def labeller(self):
        c = self.config
        if c.labeler == "reward":
            reward = load_reward(c.labeler_reward, **{"device": self.device, **c.labeler_args})
            return RewardSegmentLabeler(reward, c.tie_margin)
        if c.labeler == "vlm":
            if not c.judge_model:
                raise ConfigError("densedpo.labeler: vlm needs densedpo.judge_model (a VLM hub id or folder)")
            from mmalign.models.vlm import VisionLanguageModel

            judge = VisionLanguageModel.from_pretrained(
                c.judge_model, device=self.device, allow_pickle=self.run.model.allow_pickle
            )
            return VLMSegmentJudge(judge)
        if c.labeler == "reference":
            return ReferenceTrackLabeler(**{"tie_margin": c.tie_margin, **c.labeler_args})
        raise ConfigError(f"densedpo.labeler must be reward, vlm or reference, got {c.labeler!r}")

    def build_pairs(self, folder: Path) -> None:
        """Generate `num_videos` pairs with the starting model, label them and store them in `folder`."""
        c = self.config
        clips = load_clips(self.run.data, c.num_videos, self.run.seed)
        labeller = self.labeller()
        source = {"reward": c.labeler_reward, "vlm": c.judge_model}.get(c.labeler, c.labeler)
        kept: dict[str, list[torch.Tensor]] = {"latents_0": [], "latents_1": []}
        if c.pairs == "structural":
            kept["latents_real"] = []  # the real clips, for `sft_target: real`
        pairs = []
        for start in tqdm(range(0, len(clips), c.build_batch), desc="building pairs", leave=False):
            batch = clips[start : start + c.build_batch]
            prompts, fps = [clip.prompt for clip in batch], batch[0].fps
            x0 = self.encode([clip.frames for clip in batch]).to(self.device)
            real = torch.stack([frames_to_tensor(clip.frames) for clip in batch]) / 2 + 0.5  # [0, 1]
            references = real if c.pairs == "structural" else None  # what the reference labeller compares with
            rng = np.random.default_rng([self.run.seed, start])
            eta = float(rng.uniform(*c.eta)) if c.pairs == "structural" else 1.0
            generators = [keyed_generator(self.run.seed, start, f"pair{k}") for k in (0, 1)]
            latents = [self.regenerate(prompts, x0, eta, g) for g in generators]
            videos = [self.model.decode_latents(z) for z in latents]
            if c.labels == "segment":
                labels = labeller(videos[0], videos[1], prompts, fps, c.segment_seconds, references)
            else:
                if isinstance(labeller, RewardSegmentLabeler):
                    clip_label = labeller.clip_labels(videos[0], videos[1], prompts)
                else:
                    clip_label = majority(labeller(videos[0], videos[1], prompts, fps, c.segment_seconds, references))
                segments = len(pixel_segment_bounds(videos[0].shape[2], fps, c.segment_seconds))
                labels = clip_label[:, None].expand(-1, segments)
            for i, clip in enumerate(batch):
                if not labels[i].any():
                    continue  # all ties: nothing to learn (the paper drops these pairs)
                meta = {"eta": eta, "source": clip.source, "pair_kind": c.pairs, "label_source": source}
                frames = [tensor_to_frames(v[i]) for v in videos]
                pairs.append(VideoPair(clip.prompt, *frames, fps, c.segment_seconds, labels[i].tolist(), meta))
                kept["latents_0"].append(latents[0][i].cpu())
                kept["latents_1"].append(latents[1][i].cpu())
                if "latents_real" in kept:
                    kept["latents_real"].append(x0[i].cpu())
        if not pairs:
            raise RuntimeError("every built pair was a tie on every segment; lower densedpo.tie_margin")
        self.save_pairs(folder, pairs, kept)
