"""Opening images the same way everywhere: 8-bit RGB, high bit depths rescaled rather than clipped."""

from __future__ import annotations

import numpy as np
from PIL import Image, UnidentifiedImageError

#: what opening or decoding an image can raise for a bad file (PIL's decompression-bomb guard included)
IMAGE_ERRORS: tuple[type[Exception], ...] = (
    UnidentifiedImageError,
    OSError,
    ValueError,
    Image.DecompressionBombError,
)

#: integer modes wider than 8 bits and the largest value their samples take
_WIDE_MODES = {"I;16": 65535, "I;16B": 65535, "I;16L": 65535, "I;16N": 65535}


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB. 16-bit images are rescaled from [0, 65535], 32-bit integer and float
    images from their own [min, max] (PIL's `convert` would clip them to white)."""
    if image.mode in _WIDE_MODES:
        pixels = np.asarray(image, dtype=np.float64) / _WIDE_MODES[image.mode]
    elif image.mode in ("I", "F"):
        pixels = np.asarray(image, dtype=np.float64)
        low, high = float(pixels.min()), float(pixels.max())
        pixels = (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)
    else:
        return image.convert("RGB")
    grey = np.clip(np.round(pixels * 255), 0, 255).astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")
