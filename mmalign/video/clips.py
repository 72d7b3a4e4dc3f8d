"""Ground-truth clips and stored preference pairs of videos.

- `load_clips(data, …)`: real clips with captions, from `embedded:balls-world` (the simulator renders
  train captions) or a folder of MP4/GIF clips indexed by `captions.jsonl` (or `videos.jsonl`) rows
  `{"video": file, "prompt": text, "fps": …}` (`file` and `caption` are accepted for `video` and
  `prompt`; fps optional when the file records it). A user's clips are conformed to one shape
  (`conform`): resampled to one frame rate, cut to one length, resized and centre-cropped to one
  size, as the model trains on batches of equal clips.
- `load_video_pairs(folder)`: a folder with `pairs.jsonl` rows `{"prompt", "video_0", "video_1",
  "seg_labels": [+1|0|-1 per segment], "fps"?, "segment_len_s"?}` (+1: video_0 better on that
  segment). Errors name the file, the row and the field: unreadable video, fps missing, pairs whose
  two videos differ in length or size, too few frames for one segment, a label count that does
  not match the segments.
- `write_video_pairs(folder, pairs)`: the same format, atomically (temp folder, then rename).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmalign.config import ConfigError, DataSource, option
from mmalign.data import balls_world
from mmalign.data.pairs import DataError, inside, jsonl_rows
from mmalign.data.segments import segment_count
from mmalign.data.video import read_video, write_video
from mmalign.io import atomic_directory

EMBEDDED_CLIPS = "embedded:balls-world"


@dataclass
class ClipDataConfig(DataSource):
    """The `data` section of the video pair methods: the real clips pairs are built from."""

    path: str = option(
        "a folder of MP4/GIF clips with captions.jsonl (or videos.jsonl) rows {video, prompt, fps?}, "
        f"or {EMBEDDED_CLIPS}",
        default=EMBEDDED_CLIPS,
    )
    fps: float | None = option("your clips: frame rate they are resampled to; null = the first clip's", default=None)
    num_frames: int | None = option(
        "your clips: frames kept from the start of each; null = the shortest clip's", default=None
    )
    resolution: list[int] | None = option(
        "your clips: [height, width] they are resized and centre-cropped to; null = the first clip's size", default=None
    )

    def __post_init__(self) -> None:
        if self.resolution is not None and (len(self.resolution) != 2 or min(self.resolution) < 1):
            raise ConfigError(f"data.resolution must be [height, width], got {self.resolution}")
        if (self.fps is not None and self.fps <= 0) or (self.num_frames is not None and self.num_frames < 1):
            raise ConfigError("data.fps and data.num_frames must be positive")
        self.refuse_unless(self.path != EMBEDDED_CLIPS, ("fps", "num_frames", "resolution"), "your clips")


class VideoDataError(DataError):
    """A video data file or row that cannot be used; the message names file, row and field."""


@dataclass
class Clip:
    prompt: str
    frames: np.ndarray  # (F, H, W, 3) uint8
    fps: float
    source: str


@dataclass
class VideoPair:
    """Two aligned clips of one prompt and their labels per segment (+1: `frames_0` better)."""

    prompt: str
    frames_0: np.ndarray
    frames_1: np.ndarray
    fps: float
    segment_seconds: float
    labels: list[int]
    meta: dict[str, Any] = field(default_factory=dict)


def _rows(path: Path) -> list[tuple[int, dict]]:
    if not path.is_file():
        raise VideoDataError(f"{path}: no such file")
    rows = list(jsonl_rows(path, ()))  # fields are checked below, with this module's messages
    if not rows:
        raise VideoDataError(f"{path}: no rows")
    return rows


def _field(row: dict, name: str, where: str) -> Any:
    if name not in row:
        raise VideoDataError(f"{where}: missing field {name!r}")
    return row[name]


def _read(folder: Path, row: dict, name: str, where: str):
    from mmalign.data.video import VideoError

    file = inside(folder, str(_field(row, name, where)), f"{where} field {name!r}")
    try:
        return read_video(file)
    except VideoError as error:
        raise VideoDataError(f"{where} field {name!r}: {error}") from None


def _fps(row: dict, video_fps: float | None, where: str) -> float:
    fps = row.get("fps", video_fps)
    if fps is None or not isinstance(fps, (int, float)) or fps <= 0:
        raise VideoDataError(f"{where}: field 'fps' is missing or not positive, and the video records none")
    return float(fps)


def _either(row: dict, names: tuple[str, str], where: str) -> str:
    """The first of two accepted field names the row has."""
    for name in names:
        if name in row:
            return name
    raise VideoDataError(f"{where}: missing field {names[0]!r} (or {names[1]!r})")


def conform(clip: Clip, fps: float, num_frames: int, size: tuple[int, int]) -> Clip:
    """`clip` resampled to `fps` (nearest frame), cut to its first `num_frames` frames and resized
    (covering, bilinear) then centre-cropped to `size = (height, width)`."""
    from PIL import Image

    length = int(len(clip.frames) * fps / clip.fps + 1e-6)
    if length < num_frames:
        raise VideoDataError(
            f"{clip.source}: {len(clip.frames)} frames at {clip.fps:g} fps give {length} at "
            f"{fps:g} fps, fewer than the {num_frames} every clip needs (data.num_frames)"
        )
    picks = np.minimum(np.round(np.arange(num_frames) * clip.fps / fps).astype(int), len(clip.frames) - 1)
    frames = clip.frames[picks]
    height, width = size
    if frames.shape[1:3] != (height, width):
        scale = max(height / frames.shape[1], width / frames.shape[2])
        resized = (round(frames.shape[2] * scale), round(frames.shape[1] * scale))  # PIL: (width, height)
        top, left = (resized[1] - height) // 2, (resized[0] - width) // 2
        frames = np.stack([
            np.asarray(Image.fromarray(f).resize(resized, Image.BILINEAR))[top : top + height, left : left + width]
            for f in frames
        ])  # fmt: skip
    return Clip(clip.prompt, frames, fps, clip.source)


def load_clips(data: ClipDataConfig, count: int, seed: int) -> list[Clip]:
    """`count` ground-truth clips: rendered train captions for `embedded:balls-world`, else the first
    `count` rows of the folder's `captions.jsonl` (or `videos.jsonl`), conformed to one shape."""
    if data.path == EMBEDDED_CLIPS:
        rng = np.random.default_rng(seed)
        captions = balls_world.captions("train")
        picks = [captions[i % len(captions)] for i in rng.permutation(max(count, len(captions)))[:count]]
        return [Clip(c, balls_world.render(c, rng), balls_world.FPS, f"balls-world #{i}") for i, c in enumerate(picks)]
    folder = Path(data.path)
    index = next((folder / n for n in ("captions.jsonl", "videos.jsonl") if (folder / n).is_file()), None)
    if index is None:
        raise VideoDataError(f"{folder}: no captions.jsonl (rows {{video, prompt, fps?}}) or videos.jsonl")
    clips = []
    for number, row in _rows(index)[:count]:
        where = f"{index} row {number}"
        video = _read(folder, row, _either(row, ("video", "file"), where), where)
        prompt = row[_either(row, ("prompt", "caption"), where)]
        clips.append(Clip(str(prompt), video.frames, _fps(row, video.fps, where), where))
    fps = data.fps or clips[0].fps
    num_frames = data.num_frames or min(int(len(c.frames) * fps / c.fps + 1e-6) for c in clips)
    size = tuple(data.resolution) if data.resolution else clips[0].frames.shape[1:3]
    return [conform(c, fps, num_frames, size) for c in clips]


def load_video_pairs(folder: str | Path, default_segment_seconds: float = 1.0) -> list[VideoPair]:
    folder = Path(folder)
    table = folder / "pairs.jsonl"
    pairs = []
    for number, row in _rows(table):
        where = f"{table} row {number}"
        video_0, video_1 = _read(folder, row, "video_0", where), _read(folder, row, "video_1", where)
        if video_0.frames.shape != video_1.frames.shape:
            raise VideoDataError(
                f"{where}: video_0 and video_1 differ in length or size ({video_0.frames.shape} vs "
                f"{video_1.frames.shape}); a pair must be temporally aligned"
            )
        fps = _fps(row, video_0.fps, where)
        seconds = float(row.get("segment_len_s", default_segment_seconds))
        expected = segment_count(len(video_0.frames), fps, seconds, where)
        labels = _field(row, "seg_labels", where)
        if not isinstance(labels, list) or len(labels) != expected or any(v not in (-1, 0, 1) for v in labels):
            raise VideoDataError(
                f"{where}: field 'seg_labels' must list {expected} values in {{-1, 0, 1}} "
                f"({len(video_0.frames)} frames at {fps:g} fps in {seconds:g} s segments), got {labels!r}"
            )
        meta = {k: v for k, v in row.items() if k not in ("prompt", "video_0", "video_1", "seg_labels")}
        pairs.append(VideoPair(str(_field(row, "prompt", where)), video_0.frames, video_1.frames, fps, seconds,
                               [int(v) for v in labels], meta))  # fmt: skip
    return pairs


def write_video_pairs(folder: str | Path, pairs: list[VideoPair], suffix: str = ".gif") -> Path:
    """Write `pairs` as `pairs.jsonl` + one file per video (GIF by default: lossless for the embedded
    world's few colours), atomically."""
    folder = Path(folder)
    with atomic_directory(folder) as tmp:
        lines = []
        for i, pair in enumerate(pairs):
            names = [f"pair-{i:05d}-{k}{suffix}" for k in (0, 1)]
            write_video(tmp / names[0], pair.frames_0, pair.fps)
            write_video(tmp / names[1], pair.frames_1, pair.fps)
            row = {"prompt": pair.prompt, "video_0": names[0], "video_1": names[1], "fps": pair.fps,
                   "segment_len_s": pair.segment_seconds, "seg_labels": pair.labels, **pair.meta}  # fmt: skip
            lines.append(json.dumps(row))
        (tmp / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return folder
