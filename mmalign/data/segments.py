"""Time segments of a video and the latent frames that carry them.

A clip of `T` pixel frames at `fps` split into segments of `s` seconds has `ceil(T / (s·fps))`
segments; pixel frame `p` lies in segment `⌊p / (s·fps)⌋`. A video autoencoder that compresses
time by `k` makes each latent frame out of a span of pixel frames:

- causal (Wan-class): latent frame 0 ↔ pixel frame 0, latent frame j ≥ 1 ↔ pixel frames
  `(j−1)k+1 … jk`;
- per-frame (AnimateDiff, k = 1): latent frame j ↔ pixel frame j.

Each latent frame goes to the segment that holds the majority of its pixel frames (an exact tie
goes to the later segment, DenseDPO's convention). A segment that receives no latent frame cannot
be trained; `latent_frame_segments` reports which segments those are.
"""

from __future__ import annotations

import math

import torch

from mmalign.errors import UserInputError


class SegmentError(UserInputError):
    """A clip that cannot be split as asked (fps missing, fewer frames than one segment)."""


def frames_per_segment(fps: float | None, segment_seconds: float, where: str = "video") -> float:
    """Pixel frames in one segment; a clear error for a missing fps or a non-positive length."""
    if fps is None or not fps > 0:
        raise SegmentError(f"{where}: fps is missing or not positive ({fps!r}); segments are measured in seconds")
    if not segment_seconds > 0:
        raise SegmentError(f"{where}: segment length must be positive, got {segment_seconds} s")
    return fps * segment_seconds


def segment_count(pixel_frames: int, fps: float | None, segment_seconds: float, where: str = "video") -> int:
    """`ceil(T / (s·fps))`; a clip shorter than one whole segment is an error naming `where`."""
    per_segment = frames_per_segment(fps, segment_seconds, where)
    if pixel_frames < per_segment - 1e-9:
        raise SegmentError(
            f"{where}: {pixel_frames} frames at {fps} fps is shorter than one {segment_seconds} s segment "
            f"({per_segment:g} frames)"
        )
    return math.ceil(pixel_frames / per_segment - 1e-9)


def latent_frame_spans(latent_frames: int, temporal_compression: int, causal: bool) -> list[range]:
    """The pixel frames each latent frame covers, as ranges."""
    k = temporal_compression
    if causal:
        return [range(0, 1)] + [range((j - 1) * k + 1, j * k + 1) for j in range(1, latent_frames)]
    return [range(j * k, (j + 1) * k) for j in range(latent_frames)]


def latent_frame_segments(
    pixel_frames: int,
    latent_frames: int,
    fps: float | None,
    segment_seconds: float,
    temporal_compression: int,
    causal: bool,
    where: str = "video",
) -> tuple[torch.Tensor, int, list[int]]:
    """Map latent frames to time segments by majority of their pixel frames.

    Returns `frame_segment (latent_frames,)` int64 (the input `per_segment_mse` takes), the number
    of segments `S = ceil(T / (s·fps))`, and the indices of segments that received no latent frame.
    """
    num_segments = segment_count(pixel_frames, fps, segment_seconds, where)
    per_segment = frames_per_segment(fps, segment_seconds, where)
    assignment = []
    for span in latent_frame_spans(latent_frames, temporal_compression, causal):
        counts: dict[int, int] = {}
        for p in span:
            if p < pixel_frames:
                segment = min(math.floor(p / per_segment + 1e-9), num_segments - 1)
                counts[segment] = counts.get(segment, 0) + 1
        if not counts:
            raise SegmentError(f"{where}: latent frame {len(assignment)} covers no pixel frame of {pixel_frames}")
        best = max(counts.values())
        assignment.append(max(s for s, c in counts.items() if c == best))  # ties → the later segment
    frame_segment = torch.tensor(assignment, dtype=torch.long)
    empty = sorted(set(range(num_segments)) - set(assignment))
    return frame_segment, num_segments, empty


def pixel_segment_bounds(pixel_frames: int, fps: float | None, segment_seconds: float) -> list[tuple[int, int]]:
    """`[start, stop)` pixel-frame bounds of every segment (the last one may be short)."""
    per_segment = frames_per_segment(fps, segment_seconds)
    count = segment_count(pixel_frames, fps, segment_seconds)
    return [(round(i * per_segment), min(pixel_frames, round((i + 1) * per_segment))) for i in range(count)]
