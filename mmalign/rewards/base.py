"""The `Reward` protocol: `reward(samples, prompts=None) -> torch.Tensor (N,)`.

Samples may be image file paths, PIL images, uint8 arrays `(H, W, 3)`, or a float tensor
`(N, 3, H, W)` in [0, 1]; one prompt string is broadcast to every sample. Subclasses implement
`score_batch(images, prompts)` on a float tensor batch; batching and a progress bar for large
inputs come from here.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from mmalign.data.images import IMAGE_ERRORS, to_rgb
from mmalign.errors import UserInputError


class RewardInputError(UserInputError):
    """Samples or prompts a reward cannot score; the message names the item."""


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB, with a clear error naming the file."""
    try:
        with Image.open(path) as im:
            return to_rgb(im)
    except FileNotFoundError:
        raise RewardInputError(f"{path}: no such file") from None
    except IMAGE_ERRORS as exc:
        raise RewardInputError(f"{path}: not a readable image ({exc})") from None


def to_image_tensor(sample: Any, where: str = "sample") -> torch.Tensor:
    """One sample → `(3, H, W)` float in [0, 1]."""
    if isinstance(sample, (str, Path)):
        sample = load_image(sample)
    if isinstance(sample, Image.Image):
        sample = np.asarray(to_rgb(sample))
    if isinstance(sample, np.ndarray):
        if sample.ndim != 3 or sample.shape[-1] != 3:
            raise RewardInputError(f"{where}: expected an (H, W, 3) image array, got shape {sample.shape}")
        scale = 255.0 if sample.dtype == np.uint8 else 1.0
        return torch.from_numpy(np.array(sample)).permute(2, 0, 1).float() / scale  # a writable copy
    if isinstance(sample, torch.Tensor):
        if sample.ndim != 3 or sample.shape[0] != 3:
            raise RewardInputError(f"{where}: expected a (3, H, W) image tensor, got shape {tuple(sample.shape)}")
        return sample.float()
    raise RewardInputError(f"{where}: cannot score an object of type {type(sample).__name__}")


def as_image_batch(samples: Any) -> list[torch.Tensor] | torch.Tensor:
    """A `(N, 3, H, W)` tensor passes through; anything else becomes a list of `(3, H, W)` tensors."""
    if isinstance(samples, torch.Tensor):
        if samples.ndim != 4 or samples.shape[1] != 3:
            raise RewardInputError(f"expected an (N, 3, H, W) image tensor, got shape {tuple(samples.shape)}")
        return samples.float()
    if isinstance(samples, (str, Path, Image.Image, np.ndarray)):
        samples = [samples]
    return [
        to_image_tensor(s, where=str(s) if isinstance(s, (str, Path)) else f"sample {i}") for i, s in enumerate(samples)
    ]


def broadcast_prompts(prompts: str | Sequence[str] | None, n: int, required: bool) -> list[str] | None:
    if prompts is None:
        if required:
            raise RewardInputError("this reward scores images against prompts; pass prompts=")
        return None
    if isinstance(prompts, str):
        return [prompts] * n
    prompts = list(prompts)
    if len(prompts) != n:
        raise RewardInputError(f"got {n} samples but {len(prompts)} prompts; pass one prompt or one per sample")
    return prompts


class Reward(ABC):
    """A batched scorer. Higher is better. Subclasses set `name` and implement `score_batch`."""

    name: str = "reward"
    needs_prompts: bool = True
    batch_size: int = 64
    progress_threshold: int = 256  # show a progress bar above this many samples

    @abstractmethod
    def score_batch(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        """`images (N, 3, H, W)` in [0, 1] (same size within a batch) → scores `(N,)` on CPU."""

    def as_batch(self, samples: Any) -> list[torch.Tensor] | torch.Tensor:
        """Samples → one tensor or a list of per-sample tensors (images here; video rewards override)."""
        return as_image_batch(samples)

    def __call__(
        self, samples: Any, prompts: str | Sequence[str] | None = None, progress: bool | None = None
    ) -> torch.Tensor:
        """Scores `(N,)` of `samples` (see the module doc) against `prompts` (one, or one per sample).

        An image reward given videos or meshes scores sampled frames or rendered views
        (`mmalign.rewards.media`: 8 evenly spaced frames, 4 views of 224 px, mean-pooled).
        """
        if getattr(self, "file_kind", "image") == "image":
            from mmalign.rewards import media

            kind = media.media_kind(samples)
            if kind != "image":
                wrapper = media.wrapper_class("video:" if kind == "video" else "mesh-views:")
                return wrapper(self)(samples, prompts, progress)
        images = self.as_batch(samples)
        n = len(images)
        prompt_list = broadcast_prompts(prompts, n, self.needs_prompts)
        show = n > self.progress_threshold if progress is None else progress
        scores = []
        for start in tqdm(range(0, n, self.batch_size), desc=f"scoring ({self.name})", disable=not show, unit="batch"):
            chunk = images[start : start + self.batch_size]
            batch = chunk if isinstance(chunk, torch.Tensor) else stack_images(chunk)
            chunk_prompts = None if prompt_list is None else prompt_list[start : start + self.batch_size]
            scores.append(self.score_batch(batch, chunk_prompts).detach().float().cpu())
        return torch.cat(scores) if scores else torch.zeros(0)


def stack_images(images: list[torch.Tensor]) -> torch.Tensor:
    sizes = {tuple(im.shape) for im in images}
    if len(sizes) == 1:
        return torch.stack(images)
    # Mixed sizes: resize to the first image's size (rewards resize to their own input size anyway).
    h, w = images[0].shape[1:]
    return torch.stack(
        [
            torch.nn.functional.interpolate(
                im[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False
            )[0]
            for im in images
        ]
    )
