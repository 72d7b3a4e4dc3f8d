"""JPEG (in)compressibility, DDPO's prompt-free rewards (Black et al. 2023).

Checked against kvablack/ddpo-pytorch, `ddpo_pytorch/rewards.py` (`jpeg_incompressibility`,
`jpeg_compressibility`): each image is quantised to uint8 (`(x · 255).round().clamp(0, 255)`),
saved by PIL as JPEG at quality 95, and the file size in kB (bytes / 1000) is the
incompressibility; compressibility is its negative. Not differentiable.
"""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from mmalign.rewards.base import Reward


def jpeg_kilobytes(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Sizes `(N,)` in kB (1000 bytes) of `(N, 3, H, W)` images in [0, 1] saved as JPEG at `quality`."""
    pixels = (images.detach().float() * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    sizes = []
    for array in pixels.transpose(0, 2, 3, 1):
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


class JpegIncompressibility(Reward):
    """JPEG size in kB at quality 95: larger (more detail) scores higher. Prompts are ignored.

    Args:
        quality: JPEG quality (DDPO uses 95).
        batch_size: images encoded per batch.
        device: the device training passes every reward; the encoding runs on the CPU whatever it is.
    """

    name = "jpeg-incompressibility"
    needs_prompts = False
    sign = 1.0

    def __init__(self, quality: int = 95, batch_size: int = 64, device: str | torch.device = "cpu"):
        self.quality = quality
        self.batch_size = batch_size
        self.device = torch.device(device)

    def score_batch(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        return self.sign * jpeg_kilobytes(images, self.quality)


class JpegCompressibility(JpegIncompressibility):
    """Negative JPEG size in kB at quality 95: smaller files (simpler images) score higher."""

    name = "jpeg-compressibility"
    sign = -1.0
