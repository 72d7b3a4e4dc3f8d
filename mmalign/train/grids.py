"""Sample grids: images with their captions, as one PIL image (saved as PNG in run directories)."""

from __future__ import annotations

import textwrap

import torch
from PIL import Image, ImageDraw, ImageFont


def image_grid(
    images: torch.Tensor, captions: list[str] | None = None, columns: int = 8, cell: int = 128, caption_lines: int = 3
) -> Image.Image:
    """`images (N, 3, H, W)` in [0, 1] → a grid; each image is scaled (nearest) to `cell` pixels high,
    keeping its aspect ratio.

    Captions are wrapped under their image; pass None for a grid without text.
    """
    n, _, height, width = images.shape
    cell_w = max(1, round(cell * width / height))
    columns = max(1, min(columns, n))
    rows = (n + columns - 1) // columns
    font = ImageFont.load_default()
    chars = max(8, cell_w // 6)
    text_h = 11 * caption_lines + 4 if captions else 0
    grid = Image.new("RGB", (columns * cell_w, rows * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    arrays = (images.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    for i, array in enumerate(arrays):
        x, y = (i % columns) * cell_w, (i // columns) * (cell + text_h)
        grid.paste(Image.fromarray(array).resize((cell_w, cell), Image.NEAREST), (x, y))
        if captions:
            lines = textwrap.wrap(captions[i], chars)[:caption_lines]
            for j, line in enumerate(lines):
                draw.text((x + 2, y + cell + 2 + 11 * j), line, fill="black", font=font)
    return grid


def side_by_side(
    left: Image.Image, right: Image.Image, labels: tuple[str, str] = ("before", "after"), gap: int = 16
) -> Image.Image:
    """Two grids next to each other with a label above each."""
    header = 16
    width = left.width + gap + right.width
    out = Image.new("RGB", (width, header + max(left.height, right.height)), "white")
    draw = ImageDraw.Draw(out)
    out.paste(left, (0, header))
    out.paste(right, (left.width + gap, header))
    draw.text((4, 2), labels[0], fill="black", font=ImageFont.load_default())
    draw.text((left.width + gap + 4, 2), labels[1], fill="black", font=ImageFont.load_default())
    return out


def video_strips(
    videos: torch.Tensor, captions: list[str] | None = None, frames: int = 6, cell: int = 96
) -> Image.Image:
    """`videos (N, 3, F, H, W)` in [0, 1] → a grid with one row per clip: `frames` evenly spaced frames
    side by side, captioned (how a report shows motion in a PNG)."""
    picks = torch.linspace(0, videos.shape[2] - 1, min(frames, videos.shape[2])).round().long()
    strips = torch.cat([videos[:, :, int(f)] for f in picks], dim=-1)  # (N, 3, H, k·W)
    return image_grid(strips, captions, columns=1, cell=cell, caption_lines=1)


def video_grid_frames(videos: torch.Tensor, captions: list[str] | None = None, cell: int = 96) -> list[Image.Image]:
    """`videos (N, 3, F, H, W)` in [0, 1] → one grid image per frame (written as an animated GIF)."""
    return [image_grid(videos[:, :, f], captions, cell=cell, caption_lines=2) for f in range(videos.shape[2])]
