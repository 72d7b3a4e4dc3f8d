"""Video files in and out: frames are `(F, H, W, 3)` uint8 RGB arrays, timing is frames per second.

- `read_video(path) -> Video` decodes MP4/WebM/MKV/MOV/AVI (PyAV) or an animated GIF (Pillow) and
  reads its frame rate from the container (GIF keeps frame durations in 10 ms units, so 8 fps
  comes back as 8.33); a file that cannot be decoded, holds no frame or has no
  usable frame rate raises `VideoError` naming the file.
- `write_video(path, frames, fps)` writes MP4 (H.264, yuv420p) or GIF by the suffix, atomically (a
  temp file renamed into place), so a killed run never leaves a truncated video that looks whole.
- `frames_to_tensor` / `tensor_to_frames` convert to and from `(3, F, H, W)` floats in [-1, 1],
  the layout video VAEs read.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmalign.errors import UserInputError

VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".mov", ".avi", ".gif")


class VideoError(UserInputError):
    """A video file that cannot be read or written as asked; the message names the file."""


@dataclass
class Video:
    """Decoded frames `(F, H, W, 3)` uint8 and their rate in frames per second."""

    frames: np.ndarray
    fps: float

    @property
    def seconds(self) -> float:
        return len(self.frames) / self.fps


def _check_frames(frames: np.ndarray, where: str) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise VideoError(f"{where}: frames must have shape (F, H, W, 3), got {frames.shape}")
    if len(frames) == 0:
        raise VideoError(f"{where}: no frames")
    if frames.dtype != np.uint8:
        raise VideoError(f"{where}: frames must be uint8, got {frames.dtype}")
    return frames


def _read_gif(path: Path) -> Video:
    with Image.open(path) as image:
        frames, durations = [], []
        for index in range(getattr(image, "n_frames", 1)):
            image.seek(index)
            frames.append(np.asarray(image.convert("RGB")))
            durations.append(image.info.get("duration", 0))
    if not any(durations):
        raise VideoError(f"{path}: the GIF gives no frame duration, so its fps is unknown")
    mean_ms = sum(durations) / len(durations)
    return Video(np.stack(frames), 1000.0 / mean_ms)


def _read_av(path: Path) -> Video:
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise VideoError(f"{path}: the file has no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    if not rate:
        raise VideoError(f"{path}: the container records no frame rate (fps missing)")
    if not frames:
        raise VideoError(f"{path}: the video stream holds no frame")
    return Video(np.stack(frames), float(rate))


def read_video(path: str | Path) -> Video:
    """Decode a video file into `Video(frames (F, H, W, 3) uint8, fps)`; `VideoError` names the file."""
    path = Path(path)
    if not path.is_file():
        raise VideoError(f"{path}: no such video file")
    if path.suffix.lower() not in VIDEO_SUFFIXES:
        raise VideoError(f"{path}: unsupported video suffix {path.suffix!r}; expected one of {VIDEO_SUFFIXES}")
    try:
        video = _read_gif(path) if path.suffix.lower() == ".gif" else _read_av(path)
    except VideoError:
        raise
    except Exception as error:  # decoders raise many types; the user needs the file name
        raise VideoError(f"{path}: unreadable video ({type(error).__name__}: {error})") from error
    if len(video.frames) == 0:
        raise VideoError(f"{path}: the video holds no frame")
    return video


def _write_mp4(path: Path, frames: np.ndarray, fps: float) -> None:
    import av

    height, width = frames.shape[1:3]
    if height % 2 or width % 2:  # yuv420p halves the chroma planes
        frames = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for array in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(array), format="rgb24")))
        container.mux(stream.encode())


def _write_gif(path: Path, frames: np.ndarray, fps: float) -> None:
    images = [Image.fromarray(array) for array in frames]
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=1000.0 / fps, loop=0)


def write_video(path: str | Path, frames: np.ndarray, fps: float) -> Path:
    """Write `frames (F, H, W, 3)` uint8 at `fps` as MP4 or GIF (by suffix), atomically."""
    path = Path(path)
    frames = _check_frames(frames, str(path))
    if not fps or fps <= 0:
        raise VideoError(f"{path}: fps must be positive, got {fps}")
    suffix = path.suffix.lower()
    if suffix not in (".mp4", ".gif"):
        raise VideoError(f"{path}: can write .mp4 or .gif, not {path.suffix!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}-", suffix=suffix)
    os.close(handle)
    try:
        (_write_gif if suffix == ".gif" else _write_mp4)(Path(tmp), frames, fps)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def frames_to_tensor(frames: np.ndarray) -> torch.Tensor:
    """`(F, H, W, 3)` uint8 → `(3, F, H, W)` float32 in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(3, 0, 1, 2).float() / 127.5 - 1.0


def tensor_to_frames(video: torch.Tensor) -> np.ndarray:
    """`(3, F, H, W)` floats in [0, 1] → `(F, H, W, 3)` uint8."""
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"expected a (3, F, H, W) video, got shape {tuple(video.shape)}")
    return (video.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 3, 0).cpu().numpy()
