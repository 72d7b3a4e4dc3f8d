"""The embedded video world: a ball bouncing under gravity, with captions and a physics gold metric.

A clip is `FRAMES` frames at `FPS` (17 frames, 8 fps: 2.1 s) of `SIZE`×`SIZE` pixels: a dark room
with a grey floor and one ball of a named colour and size, thrown from the left, the centre or the
right with a small horizontal speed, falling under gravity `GRAVITY` (px/s²) and bouncing on the
floor with restitution `e`. The caption names colour, size, start side and the number of bounces
in the clip: "a small red ball thrown from the left bounces twice".

`simulate(caption, rng)` draws the free parameters (drop height, speeds, restitution) until the
trajectory bounces as often as the caption says; `render` draws it with an anti-aliased disc.

The **physics gold metric** (`physics_checks`) reads a clip back with plain image analysis: the
ball's centroid per frame (pixels far from the background, weighted by brightness), then its
discrete acceleration `p[t+1] − 2p[t] + p[t−1]`. Ballistic motion has acceleration `(0, g·dt²)`
everywhere except across a bounce (the ball near the floor moving down, then up). The per-triple
error is `|a − (0, g·dt²)|` in units of `g·dt²`, triples across a bounce excluded, frames without
a ball scored as the worst error. The score `exp(−error)` is in (0, 1], 1 for perfect physics,
per clip and per time segment. No training objective may use it.

Captions split by a stable hash into `train` and `heldout`.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 50, 50),
    "green": (50, 200, 70),
    "blue": (60, 110, 240),
    "yellow": (240, 215, 50),
}
SIZES: dict[str, float] = {"small": 2.2, "large": 3.4}  # radius in pixels at SIZE = 32
SIDES: dict[str, float] = {"left": 0.22, "centre": 0.5, "right": 0.78}  # start x as a share of SIZE
BOUNCES: dict[int, str] = {1: "bounces once", 2: "bounces twice"}
SIZE = 32
FRAMES = 17
FPS = 8.0
GRAVITY = 80.0  # px/s² at SIZE = 32
FLOOR = 28.0  # y of the floor surface in pixels (image y grows downwards)
BACKGROUND = (16, 16, 22)
FLOOR_COLOUR = (90, 90, 90)
HELDOUT_FRACTION = 0.2

_INK_DISTANCE = 60.0  # RGB distance from the background above which a pixel belongs to the ball
_MIN_BALL_MASS = 3.0  # a frame needs this many pixels' worth of ball to count as showing it
_MISSING_ERROR = 4.0  # error (in g·dt² units) charged to a triple with a frame missing the ball
_BOUNCE_ZONE = 11.0  # px above the floor within which the ball can turn at a floor contact between frames
_MIN_REBOUND = 25.0  # px/s: slowest bounce a simulated clip may show


@dataclass(frozen=True)
class BallScene:
    colour: str
    size: str
    side: str
    bounces: int

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.colour} ball thrown from the {self.side} {BOUNCES[self.bounces]}"


def parse_caption(caption: str) -> BallScene:
    """Inverse of `BallScene.caption`; a clear error for text outside the world."""
    words = caption.strip().lower().split()
    try:
        size, colour, side = words[1], words[2], words[7]
        tail = " ".join(words[8:])
        bounces = {text: n for n, text in BOUNCES.items()}[tail]
        if words[0] != "a" or words[3:7] != ["ball", "thrown", "from", "the"] or colour not in COLOURS:
            raise KeyError(caption)
        if size not in SIZES or side not in SIDES:
            raise KeyError(caption)
    except (IndexError, KeyError):
        raise ValueError(f"not a balls-world caption: {caption!r}") from None
    return BallScene(colour, size, side, bounces)


def all_scenes() -> list[BallScene]:
    return [BallScene(*combo) for combo in itertools.product(COLOURS, SIZES, SIDES, BOUNCES)]


def split_of(scene: BallScene) -> str:
    digest = int(hashlib.sha256(scene.caption.encode()).hexdigest()[:8], 16)
    return "heldout" if digest / 0xFFFFFFFF < HELDOUT_FRACTION else "train"


def captions(split: str) -> list[str]:
    """Every caption of `split` (`train`, `heldout` or `all`), sorted."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"unknown split {split!r}")
    return sorted(s.caption for s in all_scenes() if split == "all" or split_of(s) == split)


@dataclass(frozen=True)
class Trajectory:
    """Ball centre per frame `xy (F, 2)` in pixels and its radius."""

    xy: np.ndarray
    radius: float


def _trajectory(
    x0: float, y0: float, vx: float, vy: float, restitution: float, radius: float
) -> tuple[np.ndarray | None, list[float]]:
    """Exact ballistic flight with floor bounces, sampled at the frame times: centres `(FRAMES, 2)`
    (None once a rebound is slower than `_MIN_REBOUND`) and the upward speed (px/s) after each contact."""
    g, ground = GRAVITY, FLOOR - radius
    points, rebounds, t, x, y, v = [], [], 0.0, x0, y0, vy
    for frame in range(FRAMES):
        target = frame / FPS
        while True:  # advance (x, y, v) from time t to `target`, bouncing where the ball meets the floor
            dt = target - t
            hit = (-v + math.sqrt(max(v * v + 2 * g * (ground - y), 0.0))) / g  # y + vτ + gτ²/2 = ground
            if hit >= dt:
                x, y, v, t = x + vx * dt, y + v * dt + 0.5 * g * dt * dt, v + g * dt, target
                break
            x, v, t, y = x + vx * hit, -restitution * (v + g * hit), t + hit, ground
            rebounds.append(-v)
            if -v < _MIN_REBOUND:  # the ball is coming to rest: such a clip is not drawn
                return None, rebounds
        points.append((x, y))
    return np.array(points), rebounds


def simulate(scene: BallScene | str, rng: np.random.Generator, max_tries: int = 1000) -> Trajectory:
    """Draw drop height, speeds and restitution until the clip shows `scene.bounces` bounces, each
    leaving the floor at a visible speed (no ball coming to rest, whose physics the metric skips),
    with the ball inside the frame throughout."""
    scene = parse_caption(scene) if isinstance(scene, str) else scene
    radius = SIZES[scene.size] * SIZE / 32
    push = {"left": 4.0, "centre": 0.0, "right": -4.0}[scene.side]
    for _ in range(max_tries):
        x0 = SIDES[scene.side] * SIZE + rng.uniform(-1.5, 1.5)
        y0 = rng.uniform(radius + 1, FLOOR - radius - 8)
        vx = rng.uniform(-3.0, 3.0) + push
        vy = rng.uniform(-45.0, 10.0)
        restitution = rng.uniform(0.45, 0.9)
        xy, rebounds = _trajectory(x0, y0, vx, vy, restitution, radius)
        inside = xy is not None and (xy - radius).min() >= 0 and (xy[:, 0] + radius).max() <= SIZE
        if inside and len(rebounds) == scene.bounces:
            return Trajectory(xy, radius)
    raise RuntimeError(f"no trajectory with {scene.bounces} bounces in {max_tries} draws")


def render(caption: str | BallScene, rng: np.random.Generator) -> np.ndarray:
    """A clip `(FRAMES, SIZE, SIZE, 3)` uint8 of `caption`."""
    scene = parse_caption(caption) if isinstance(caption, str) else caption
    return draw(simulate(scene, rng), scene.colour)


def draw(trajectory: Trajectory, colour: str, supersample: int = 4) -> np.ndarray:
    frames = np.empty((len(trajectory.xy), SIZE, SIZE, 3), np.float32)
    frames[:] = BACKGROUND
    frames[:, int(FLOOR) :] = FLOOR_COLOUR
    s = supersample
    grid = (np.arange(SIZE * s) + 0.5) / s
    gy, gx = np.meshgrid(grid, grid, indexing="ij")
    for f, (x, y) in enumerate(trajectory.xy):
        inside = ((gx - x) ** 2 + (gy - y) ** 2 <= trajectory.radius**2).astype(np.float32)
        coverage = inside.reshape(SIZE, s, SIZE, s).mean(axis=(1, 3))[..., None]
        frames[f] = frames[f] * (1 - coverage) + np.array(COLOURS[colour], np.float32) * coverage
    return frames.round().astype(np.uint8)


# ------------------------------------------------------------------ gold metric
def _ball_weight(frames: np.ndarray) -> np.ndarray:
    """`(F, h, W)` ball weight of the room's pixels (above the floor line): each pixel farther than
    `_INK_DISTANCE` from the background counts by its distance share (soft edges count partly)."""
    room = np.asarray(frames, np.float32)[:, : int(FLOOR)]
    distance = np.linalg.norm(room - np.array(BACKGROUND, np.float32), axis=-1)
    return np.clip((distance - _INK_DISTANCE / 2) / _INK_DISTANCE, 0, 1)


def ball_centroids(frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per frame, the ball's centroid `(F, 2)` (x, y) and its mass `(F,)` in pixels.

    Ball pixels are weighed by `_ball_weight`; frames with less mass than `_MIN_BALL_MASS` have a
    NaN centroid.
    """
    weight = _ball_weight(frames)  # (F, h, W)
    mass = weight.sum(axis=(1, 2))
    ys, xs = np.mgrid[0 : weight.shape[1], 0 : weight.shape[2]] + 0.5
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = (weight * xs).sum(axis=(1, 2)) / mass
        cy = (weight * ys).sum(axis=(1, 2)) / mass
    centroids = np.stack([cx, cy], axis=1)
    centroids[mass < _MIN_BALL_MASS] = np.nan
    return centroids, mass


def ball_colours(frames: np.ndarray) -> list[str | None]:
    """Per frame of `(F, H, W, 3)` uint8, the named colour (`COLOURS`) nearest to the ball pixels'
    weighted mean colour; None where the frame does not show the ball (`ball_centroids`)."""
    weight = _ball_weight(frames)
    mass = weight.sum(axis=(1, 2))
    room = np.asarray(frames, np.float32)[:, : int(FLOOR)]
    names, palette = list(COLOURS), np.array(list(COLOURS.values()), np.float32)
    out: list[str | None] = []
    for w, m, pixels in zip(weight, mass, room):
        if m < _MIN_BALL_MASS:
            out.append(None)
            continue
        mean = (w[..., None] * pixels).sum(axis=(0, 1)) / m
        out.append(names[int(np.linalg.norm(palette - mean, axis=1).argmin())])
    return out


def colour_match(frames: np.ndarray, caption: str) -> float:
    """Share of the frames showing the ball whose ball has the caption's colour (0 if none shows it)."""
    colours = [c for c in ball_colours(frames) if c is not None]
    wanted = parse_caption(caption).colour
    return sum(c == wanted for c in colours) / len(colours) if colours else 0.0


def triple_errors(centroids: np.ndarray, fps: float = FPS) -> np.ndarray:
    """Error of each frame triple `(t−1, t, t+1)` against ballistic motion, in units of `g·dt²`:
    `(F − 2,)`, NaN for triples that span a floor contact."""
    expected = GRAVITY / fps**2
    accel = centroids[2:] - 2 * centroids[1:-1] + centroids[:-2]
    error = np.hypot(accel[:, 0], accel[:, 1] - expected) / expected
    # a floor contact lies in interval j or j + 1 when the ball, by the floor, moves down over j and up
    # over j + 1; both intervals are then unballistic, and so is every triple that spans one of them
    vy = np.diff(centroids[:, 1])
    near = np.maximum(centroids[1:-1, 1], np.maximum(centroids[:-2, 1], centroids[2:, 1])) > FLOOR - _BOUNCE_ZONE
    flip = (vy[:-1] > 0) & (vy[1:] <= 0) & near
    contact = np.zeros(len(vy), bool)
    contact[:-1] |= flip
    contact[1:] |= flip
    error[contact[:-1] | contact[1:]] = np.nan
    missing = np.isnan(accel).any(axis=1)
    error[missing] = _MISSING_ERROR
    return np.minimum(error, _MISSING_ERROR)


def physics_checks(frames: np.ndarray, fps: float = FPS, segment_seconds: float = 1.0) -> dict[str, object]:
    """Physics gold of a clip `(F, H, W, 3)`: `{"physics": score, "segments": [score per segment],
    "visible": share of frames showing the ball}`; scores `exp(−mean error)` in (0, 1]."""
    centroids, _ = ball_centroids(frames)
    errors = triple_errors(centroids, fps)
    per_segment = fps * segment_seconds
    middle = np.arange(1, len(frames) - 1)
    segments = []
    for s in range(math.ceil(len(frames) / per_segment - 1e-9)):
        in_segment = (middle >= s * per_segment) & (middle < (s + 1) * per_segment)
        values = errors[in_segment]
        values = values[~np.isnan(values)]
        segments.append(float(np.exp(-values.mean())) if len(values) else float("nan"))
    valid = errors[~np.isnan(errors)]
    score = float(np.exp(-valid.mean())) if len(valid) else 0.0
    return {"physics": score, "segments": segments, "visible": float((~np.isnan(centroids[:, 0])).mean())}
