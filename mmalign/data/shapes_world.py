"""The embedded shapes world: coloured shapes with captions, a renderer and a gold metric.

A scene holds one or two shapes (circle, square, triangle) in named colours on a light
background; two-shape scenes carry a spatial relation ("a red circle above a blue square").
Images are `(H, W, 3)` uint8 arrays, 32×32 by default.

The gold metric (`gold_checks`) reads an image back with plain image analysis: it segments the
image into palette colours, takes the largest connected blob of each colour, classifies its
shape from how much of its bounding box it fills, and checks count and relation from blob
centroids. No training objective may use it; it exists to measure what alignment did.

Captions are split by a stable hash into `train` and `heldout`: held-out two-shape captions are
never seen by the embedded model's pre-training nor by any alignment recipe's training prompts.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 45, 45),
    "green": (40, 170, 60),
    "blue": (45, 85, 225),
    "yellow": (235, 205, 40),
    "purple": (150, 60, 200),
    "cyan": (40, 200, 215),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
BACKGROUND: tuple[int, int, int] = (242, 240, 235)
IMAGE_SIZE = 32
HELDOUT_FRACTION = 0.15

# Gold-metric thresholds (pixel units at 32×32; scaled with the image area).
_FOREGROUND_DISTANCE = 70.0  # RGB distance from the background above which a pixel is "ink"
_PALETTE_DISTANCE = 70.0  # ink farther than this from every palette colour is "other"
_MIN_BLOB_FRACTION = 10 / 1024  # a blob smaller than this share of the image does not count
_SQUARE_FILL = 0.88  # bounding-box fill ratio: square ≈ 1.0, circle ≈ π/4
_TRIANGLE_TAPER = 0.6  # top-third width ÷ bottom-third width: triangle ≈ 0.3, circle and square ≈ 1
_RELATION_MARGIN = 1.5 / 32  # centroids must differ by this share of the image side


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str

    @property
    def text(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """One or two shapes; `relation` relates `objects[0]` to `objects[1]` ("left of" …)."""

    objects: tuple[Shape, ...]
    relation: str | None = None

    @property
    def caption(self) -> str:
        first = f"a {self.objects[0].text}"
        if len(self.objects) == 1:
            return first
        return f"{first} {self.relation} a {self.objects[1].text}"


def parse_caption(caption: str) -> Scene:
    """Inverse of `Scene.caption`; raises ValueError for text outside the world's grammar."""
    words = caption.strip().lower().split()
    if len(words) == 3 and words[0] == "a":
        scene = Scene((Shape(words[1], words[2]),))
    elif len(words) >= 7 and words[0] == "a":
        relation = " ".join(words[3:-3])
        scene = Scene((Shape(words[1], words[2]), Shape(words[-2], words[-1])), relation)
        if words[-3] != "a" or relation not in RELATIONS:
            raise ValueError(f"not a shapes-world caption: {caption!r}")
    else:
        raise ValueError(f"not a shapes-world caption: {caption!r}")
    for obj in scene.objects:
        if obj.colour not in COLOURS or obj.shape not in SHAPES:
            raise ValueError(f"not a shapes-world caption: {caption!r} (unknown {obj.text!r})")
    return scene


def all_scenes() -> list[Scene]:
    """Every caption of the world: 18 single shapes and 1080 two-shape scenes (colours differ)."""
    singles = [Shape(c, s) for c in COLOURS for s in SHAPES]
    scenes = [Scene((obj,)) for obj in singles]
    for a, b in itertools.permutations(singles, 2):
        if a.colour != b.colour:
            scenes.extend(Scene((a, b), rel) for rel in RELATIONS)
    return scenes


def split_of(scene: Scene) -> str:
    """`"heldout"` for a stable ~15 % of two-shape captions, `"train"` for everything else."""
    if len(scene.objects) == 1:
        return "train"
    digest = hashlib.md5(scene.caption.encode()).digest()
    return "heldout" if int.from_bytes(digest[:4], "little") / 2**32 < HELDOUT_FRACTION else "train"


def captions(split: str) -> list[str]:
    """All captions of a split, in a fixed order."""
    if split not in ("train", "heldout"):
        raise ValueError(f"unknown split {split!r}; expected 'train' or 'heldout'")
    return [s.caption for s in all_scenes() if split_of(s) == split]


def sample_captions(n: int, split: str, rng: np.random.Generator, single_fraction: float = 0.2) -> list[str]:
    """`n` captions drawn with replacement; about `single_fraction` of them single-shape."""
    pool = captions(split)
    singles = [c for c in pool if len(c.split()) == 3]
    pairs = [c for c in pool if len(c.split()) > 3]
    out = []
    for _ in range(n):
        source = singles if (singles and rng.random() < single_fraction) or not pairs else pairs
        out.append(source[int(rng.integers(len(source)))])
    return out


def shape_coverage(shape: str, cx: float, cy: float, r: float, size: int, supersample: int = 4) -> np.ndarray:
    """Anti-aliased coverage `(size, size)` in [0, 1] of one shape centred at (cx, cy), pixel units."""
    n = size * supersample
    ys, xs = (np.mgrid[0:n, 0:n] + 0.5) / supersample
    if shape == "circle":
        inside = (xs - cx) ** 2 + (ys - cy) ** 2 <= r**2
    elif shape == "square":
        half = r * 0.886  # same area as the circle of radius r
        inside = (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    elif shape == "triangle":
        top, bottom = cy - r, cy + r
        inside = (ys >= top) & (ys <= bottom) & (np.abs(xs - cx) <= (ys - top) / 2.0 * 1.1)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return inside.reshape(size, supersample, size, supersample).mean(axis=(1, 3))


def _place(scene: Scene, rng: np.random.Generator, size: int) -> list[tuple[float, float, float]]:
    """Centres and radii `(cx, cy, r)` in pixels that satisfy the scene's relation."""
    scale = size / IMAGE_SIZE
    radii = [float(rng.uniform(4.0, 6.5)) * scale for _ in scene.objects]
    if len(scene.objects) == 1:
        r = radii[0]
        return [(float(rng.uniform(r + 1, size - r - 1)), float(rng.uniform(r + 1, size - r - 1)), r)]
    r0, r1 = radii
    # Lay the pair out as "first before second" along the relation's axis, then mirror if needed.
    gap = r0 + r1 + 1.5 * scale
    along0 = float(rng.uniform(r0 + 1, size - 1 - r1 - gap))
    along1 = float(rng.uniform(along0 + gap, size - 1 - r1))
    across0 = float(rng.uniform(r0 + 1, size - r0 - 1))
    low, high = max(r1 + 1, across0 - size / 4), min(size - r1 - 1, across0 + size / 4)
    across1 = float(rng.uniform(low, high))
    if scene.relation in ("right of", "below"):
        along0, along1 = size - along0, size - along1
    if scene.relation in ("left of", "right of"):
        return [(along0, across0, r0), (along1, across1, r1)]
    return [(across0, along0, r0), (across1, along1, r1)]


def render(caption: str | Scene, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
    """One random rendering of a caption: `(size, size, 3)` uint8."""
    scene = parse_caption(caption) if isinstance(caption, str) else caption
    placed = [(obj, cx, cy, r) for obj, (cx, cy, r) in zip(scene.objects, _place(scene, rng, size))]
    return draw(placed, size)


def draw(placed: list[tuple[Shape, float, float, float]], size: int) -> np.ndarray:
    """Paint `(shape, cx, cy, r)` items (pixel units) in order onto the background: `(size, size, 3)` uint8."""
    image = np.broadcast_to(np.array(BACKGROUND, dtype=np.float32), (size, size, 3)).copy()
    for obj, cx, cy, r in placed:
        alpha = shape_coverage(obj.shape, cx, cy, r, size)[..., None]
        image = image * (1 - alpha) + np.array(COLOURS[obj.colour], dtype=np.float32) * alpha
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Blob:
    colour: str
    area: int
    centroid: tuple[float, float]  # (x, y) in pixels
    shape: str


def find_blobs(image: np.ndarray) -> list[Blob]:
    """The largest connected blob of each palette colour present in `image (H, W, 3)` uint8."""
    pixels = image.astype(np.float32)
    height, width = pixels.shape[:2]
    ink = np.linalg.norm(pixels - np.array(BACKGROUND, np.float32), axis=-1) > _FOREGROUND_DISTANCE
    palette = np.array(list(COLOURS.values()), np.float32)
    distance = np.linalg.norm(pixels[..., None, :] - palette, axis=-1)  # (H, W, K)
    nearest = distance.argmin(-1)
    valid = ink & (distance.min(-1) <= _PALETTE_DISTANCE)
    min_area = max(3, int(round(_MIN_BLOB_FRACTION * height * width)))
    blobs = []
    for k, name in enumerate(COLOURS):
        components, count = ndimage.label(valid & (nearest == k))
        if count == 0:
            continue
        areas = np.bincount(components.ravel())[1:]
        largest = int(areas.argmax()) + 1
        if areas[largest - 1] < min_area:
            continue
        mask = components == largest
        ys, xs = np.nonzero(mask)
        blobs.append(
            Blob(name, len(xs), (float(xs.mean()), float(ys.mean())), _classify_shape(mask[ys.min() : ys.max() + 1]))
        )
    return blobs


def _classify_shape(rows: np.ndarray) -> str:
    """Shape of a blob from its mask cropped to its rows `(h, W)` bool: taper first, then fill."""
    widths = rows.sum(axis=1).astype(np.float32)
    third = max(1, len(widths) // 3)
    taper = widths[:third].mean() / max(widths[-third:].mean(), 1.0)
    if taper < _TRIANGLE_TAPER:
        return "triangle"
    cols = np.nonzero(rows.any(axis=0))[0]
    fill = rows.sum() / (len(widths) * (cols.max() - cols.min() + 1))
    return "square" if fill >= _SQUARE_FILL else "circle"


def gold_checks(image: np.ndarray, caption: str) -> dict[str, float]:
    """Per-check results in {0, 1} and their mean `score` for one image `(H, W, 3)` uint8.

    Checks: each requested colour is present (`colour`), each present shape is the requested one
    (`shape`; triangles taper towards the top, squares fill their bounding box, circles neither),
    exactly the requested number of colour blobs is present (`count`), and for two shapes the
    relation holds between the blob centroids (`relation`). `all` is 1 when every
    check passes.
    """
    scene = parse_caption(caption)
    blobs = {b.colour: b for b in find_blobs(image)}
    found = [blobs.get(obj.colour) for obj in scene.objects]
    colour = [float(b is not None) for b in found]
    shape = [float(b is not None and b.shape == obj.shape) for b, obj in zip(found, scene.objects)]
    checks = {
        "colour": float(np.mean(colour)),
        "shape": float(np.mean(shape)),
        "count": float(len(blobs) == len(scene.objects)),
    }
    values = colour + shape + [checks["count"]]
    if scene.relation is not None:
        a, b = found
        margin = _RELATION_MARGIN * image.shape[1]
        holds = False
        if a is not None and b is not None:
            dx, dy = b.centroid[0] - a.centroid[0], b.centroid[1] - a.centroid[1]
            holds = {"left of": dx > margin, "right of": -dx > margin, "above": dy > margin, "below": -dy > margin}[
                scene.relation
            ]
        checks["relation"] = float(holds)
        values.append(checks["relation"])
    checks["all"] = float(all(v == 1.0 for v in values))
    checks["score"] = float(np.mean(values))
    return checks
