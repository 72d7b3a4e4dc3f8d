"""Preference labels per time segment of aligned video pairs, from a reward or a VLM judge.

- `RewardSegmentLabeler`: any video `Reward` applied to each segment's sub-clip of both videos;
  label `sign(r₀ − r₁)`, a tie (0) when `|r₀ − r₁| ≤ tie_margin` or either score is undefined.
  `clip_labels` gives the whole-clip label instead (VanillaDPO / StructuralDPO).
- `VLMSegmentJudge`: any model `VisionLanguageModel` loads sees the two segments as frame strips
  ("A" and "B") and answers `A`, `B` or `tie`; it is asked twice with the order swapped and only a
  consistent answer becomes a label (DenseDPO's default protocol, ours where the paper is silent).
- `ReferenceTrackLabeler` (ours): for structural pairs, the copy whose moving foreground accelerates
  more like the real clip's it was denoised from wins the segment.

Every labeller is called as `labeller(videos_0, videos_1, prompts, fps, segment_seconds, references)`
with videos `(N, 3, F, H, W)` in [0, 1] and `references` the real clips of structural pairs (same
shape) or None. Labels are `(N, S)` int64 in {−1, 0, +1}; +1 means video 0 is better on that segment.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from mmalign.data.segments import pixel_segment_bounds
from mmalign.rewards.base import Reward
from mmalign.rewards.video import foreground_track, segment_scores, window_segments

JUDGE_QUESTION = (
    "Image A and image B each show the frames of a short video clip, left to right. Which clip has fewer "
    "visual artifacts, less flicker and more physically plausible motion? Answer with A, B or tie."
)


def margin_labels(scores_0: torch.Tensor, scores_1: torch.Tensor, tie_margin: float) -> torch.Tensor:
    """`sign(s₀ − s₁)` with ties inside `tie_margin` and where a score is NaN: int64, same shape."""
    diff = scores_0 - scores_1
    labels = torch.sign(diff).long()
    labels[(diff.abs() <= tie_margin) | torch.isnan(diff)] = 0
    return labels


class ScoredSegmentLabeler:
    """Labels `margin_labels(s₀, s₁, tie_margin)` from per-segment scores `(N, S)` of each video that
    a subclass's `segment_scores(videos, prompts, fps, segment_seconds, references)` gives."""

    tie_margin: float

    def __call__(
        self,
        videos_0: torch.Tensor,
        videos_1: torch.Tensor,
        prompts: list[str],
        fps: float,
        segment_seconds: float,
        references: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`videos_k (N, 3, F, H, W)` in [0, 1] → labels `(N, S)`."""
        scores_0 = self.segment_scores(videos_0, prompts, fps, segment_seconds, references)
        scores_1 = self.segment_scores(videos_1, prompts, fps, segment_seconds, references)
        return margin_labels(scores_0, scores_1, self.tie_margin)


class RewardSegmentLabeler(ScoredSegmentLabeler):
    """Segment labels from a video reward (never the gold metric you evaluate with)."""

    def __init__(self, reward: Reward, tie_margin: float = 0.02):
        self.reward, self.tie_margin = reward, tie_margin

    def segment_scores(
        self,
        videos: torch.Tensor,
        prompts: list[str],
        fps: float,
        segment_seconds: float,
        references: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The reward of each segment `(N, S)` (`references` are not used)."""
        return segment_scores(self.reward, videos, fps, segment_seconds, prompts)

    def clip_labels(self, videos_0: torch.Tensor, videos_1: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """One label per pair `(N,)` from the reward of the whole clips."""
        return margin_labels(self.reward(videos_0, prompts), self.reward(videos_1, prompts), self.tie_margin)


def frame_strip(video: torch.Tensor, size: int | None = None) -> Image.Image:
    """`(3, F, H, W)` in [0, 1] → one image with the frames side by side (height `size` if given)."""
    strip = torch.cat(list(video.unbind(1)), dim=-1)
    image = Image.fromarray((strip.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy())
    if size is not None:
        image = image.resize((round(image.width * size / image.height), size), Image.BILINEAR)
    return image


def parse_choice(text: str) -> int | None:
    """The first decisive word of a judge's answer: `A` → 0, `B` → 1, `tie` → None, none → −1."""
    for word in text.replace(".", " ").replace(",", " ").split():
        token = word.strip().lower()
        if token == "a":
            return 0
        if token == "b":
            return 1
        if token in ("tie", "equal", "same"):
            return None
    return -1


class VLMSegmentJudge:
    """Segment labels from a VLM asked which of two frame strips is better, in both orders."""

    def __init__(self, vlm, question: str = JUDGE_QUESTION, image_size: int | None = None, max_new_tokens: int = 8):
        self.vlm, self.question = vlm, question
        self.image_size, self.max_new_tokens = image_size, max_new_tokens

    def ask(self, first: list[Image.Image], second: list[Image.Image]) -> list[int | None]:
        """The judge's choice for each (A = first, B = second) pair: 0, 1, None (tie) or −1 (no answer)."""
        from mmalign.models.vlm import Conversation

        content = [{"type": "text", "text": "A:"}, {"type": "image"}, {"type": "text", "text": "B:"},
                   {"type": "image"}, {"type": "text", "text": self.question}]  # fmt: skip
        conversations = [
            Conversation([{"role": "user", "content": content}], [a, b], f"judge prompt {i}")
            for i, (a, b) in enumerate(zip(first, second))
        ]
        prompts = self.vlm.encode(conversations)
        ids, mask = self.vlm.generate(prompts, max_new_tokens=self.max_new_tokens, do_sample=False)
        return [parse_choice(text) for text in self.vlm.decode(ids, mask)]

    def __call__(
        self,
        videos_0: torch.Tensor,
        videos_1: torch.Tensor,
        prompts: list[str],
        fps: float,
        segment_seconds: float,
        references: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`videos_k (N, 3, F, H, W)` in [0, 1] → labels `(N, S)` (`references` are not shown to the judge)."""
        bounds = pixel_segment_bounds(videos_0.shape[2], fps, segment_seconds)
        labels = torch.zeros(len(videos_0), len(bounds), dtype=torch.long)
        for s, (start, stop) in enumerate(bounds):
            strips_0 = [frame_strip(v[:, start:stop], self.image_size) for v in videos_0]
            strips_1 = [frame_strip(v[:, start:stop], self.image_size) for v in videos_1]
            forward = self.ask(strips_0, strips_1)  # A = video 0
            backward = self.ask(strips_1, strips_0)  # A = video 1
            for i, (f, b) in enumerate(zip(forward, backward)):
                if f in (0, 1) and b in (0, 1) and f != b:  # consistent: the same video wins both times
                    labels[i, s] = 1 if f == 0 else -1
        return labels


class ReferenceTrackLabeler(ScoredSegmentLabeler):
    """Segment labels by fidelity to the real clip each structural pair was denoised from (ours: the
    paper asks people or a VLM). Per segment, each copy scores `exp(−mean |a_copy − a_real| / scale)`
    over the frame triples centred in the segment, `a` the discrete acceleration
    `p[t+1] − 2p[t] + p[t−1]` (px) of the moving foreground's centroid (`foreground_track`); a triple
    where either track has lost the foreground counts `missing_error` px. It needs the real clips,
    knows no physical law, and tracks with its own rule, not the gold metric's."""

    def __init__(self, threshold: float = 0.05, scale: float = 1.0, missing_error: float = 8.0,
                 tie_margin: float = 0.02):  # fmt: skip
        self.threshold, self.scale, self.missing_error, self.tie_margin = threshold, scale, missing_error, tie_margin

    def accelerations(self, video: torch.Tensor) -> np.ndarray:
        """`(3, F, H, W)` in [0, 1] → foreground-centroid accelerations `(F − 2, 2)` in px (NaN where lost)."""
        track = foreground_track(video.clamp(0, 1).permute(1, 2, 3, 0).cpu().numpy(), self.threshold)
        return np.diff(track, n=2, axis=0)

    def segment_scores(
        self,
        videos: torch.Tensor,
        prompts: list[str],
        fps: float,
        segment_seconds: float,
        references: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Fidelity `(N, S)` in (0, 1] of `videos` to `references`, both `(N, 3, F, H, W)`; NaN for a
        segment that holds no frame triple."""
        if references is None:
            raise ValueError("the reference labeller needs the real clips the pairs were made from (structural pairs)")
        masks = window_segments(videos.shape[2], 3, fps, segment_seconds)
        out = torch.full((len(videos), len(masks)), float("nan"))
        for i, (video, reference) in enumerate(zip(videos, references)):
            error = np.linalg.norm(self.accelerations(video) - self.accelerations(reference), axis=1)
            error = np.where(np.isnan(error), self.missing_error, error)
            for s, inside in enumerate(masks):
                if inside.any():
                    out[i, s] = float(np.exp(-error[inside].mean() / self.scale))
        return out


def majority(labels: torch.Tensor) -> torch.Tensor:
    """Clip label `(N,)` by majority vote over segment labels `(N, S)` (0 when tied)."""
    return torch.sign(labels.sum(dim=1)).long()
