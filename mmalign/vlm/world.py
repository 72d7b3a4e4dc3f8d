"""The embedded VLM world: verifiable questions about shapes-world images.

Kinds (`KINDS`, each marked vision-dependent or answerable from the text alone):

| kind | question | answer |
|---|---|---|
| `count` | "How many red shapes are there?" (1–4 shapes) | 0–4 |
| `largest` | "What colour is the largest shape?" (largest radius ≥ 1.25 × the next) | a colour |
| `leftof` | "Is the circle left of the square?" (one of each, maybe a triangle) | yes / no |
| `match` | two images: "Which image shows a blue triangle?" | 1 / 2 |
| `prefer` | two renders of one caption, one with a thing changed: "Which image shows … better?" | 1 / 2 |
| `arith` | "What is 3+4?" (text only; the image is decoration, black a quarter of the time) | a digit |

Every question is drawn from its own `np.random.default_rng([seed, kind, index])`, so a set is
the same on every machine. Training streams use seeds ≥ 1000, held-out sets `HELDOUT_SEED`.
Answers are single words. The expected response format is
`<think>…</think><answer>…</answer>`; `reference_response` gives the SFT target (the thinking
names what to look at, never the answer).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image

from mmalign.data import shapes_world
from mmalign.data.shapes_world import COLOURS, SHAPES, Shape, draw
from mmalign.data.vqa import question_conversation
from mmalign.models.vlm import Conversation
from mmalign.vlm.prefs import PAIR_QUESTION, corrupt

IMAGE_SIZE = 56
HELDOUT_SEED = 7
QUESTION_COLOURS = ("red", "green", "blue", "yellow")
#: kind → whether answering needs the image
KINDS: dict[str, bool] = {"count": True, "largest": True, "leftof": True, "match": True, "prefer": True, "arith": False}
INSTRUCTION = "Think in <think></think>, then answer in <answer></answer>."
_THINKING = {
    "count": "count the {colour} shapes",
    "largest": "compare the sizes",
    "leftof": "compare the positions",
    "match": "compare both images",
    "arith": "add {a} and {b}",
    "prefer": "image 1: {first}. image 2: {second}",
}


@dataclass(frozen=True)
class Question:
    """One verifiable question: its kind, text, images `(H, W, 3)` uint8 and answer."""

    kind: str
    text: str
    images: tuple[np.ndarray, ...]
    answer: str
    thinking: str

    @property
    def vision(self) -> bool:
        return KINDS[self.kind]

    def conversation(self, blind: bool = False, source: str = "vlm-world") -> Conversation:
        """The chat prompt; `blind` shows all-black images of the same size instead (the blind control)."""
        images = [Image.fromarray(im) for im in self.images]
        return question_conversation(images, f"{self.text} {INSTRUCTION}", blind, source)

    def reference_response(self) -> str:
        return f"<think>{self.thinking}</think><answer>{self.answer}</answer>"


def _non_overlapping(rng: np.random.Generator, radii: list[float], size: int) -> list[tuple[float, float]] | None:
    centres: list[tuple[float, float]] = []
    for r in radii:
        for _ in range(100):
            c = (float(rng.uniform(r + 1, size - r - 1)), float(rng.uniform(r + 1, size - r - 1)))
            if all(np.hypot(c[0] - o[0], c[1] - o[1]) > r + q + 2 for o, q in zip(centres, radii)):
                centres.append(c)
                break
        else:
            return None
    return centres


def _scene(rng: np.random.Generator, shapes: list[Shape], radii: list[float], size: int) -> tuple[np.ndarray, list]:
    """Render shapes at random non-overlapping places: (image, [(shape, cx, cy, r)])."""
    while (centres := _non_overlapping(rng, radii, size)) is None:
        pass
    placed = [(s, cx, cy, r) for s, (cx, cy), r in zip(shapes, centres, radii)]
    return draw(placed, size), placed


def _radius(rng: np.random.Generator, size: int) -> float:
    return float(rng.uniform(0.09, 0.15)) * size


def _count(rng: np.random.Generator, size: int) -> Question:
    colour = str(rng.choice(QUESTION_COLOURS))
    n = int(rng.integers(1, 5))
    k = int(rng.integers(0, n + 1))
    others = [c for c in QUESTION_COLOURS if c != colour]
    colours = [colour] * k + [str(rng.choice(others)) for _ in range(n - k)]
    shapes = [Shape(c, str(rng.choice(SHAPES))) for c in colours]
    image, _ = _scene(rng, shapes, [_radius(rng, size) for _ in shapes], size)
    return Question(
        "count", f"How many {colour} shapes are there?", (image,), str(k), _THINKING["count"].format(colour=colour)
    )


def _largest(rng: np.random.Generator, size: int) -> Question:
    n = int(rng.integers(2, 4))
    colours = [str(c) for c in rng.choice(QUESTION_COLOURS, n, replace=False)]
    big = float(rng.uniform(0.15, 0.19)) * size
    radii = [big] + [float(rng.uniform(0.07, big / size / 1.3)) * size for _ in range(n - 1)]
    shapes = [Shape(c, str(rng.choice(SHAPES))) for c in colours]
    image, _ = _scene(rng, shapes, radii, size)
    return Question("largest", "What colour is the largest shape?", (image,), colours[0], _THINKING["largest"])


def _leftof(rng: np.random.Generator, size: int) -> Question:
    shapes = [Shape(str(rng.choice(QUESTION_COLOURS)), "circle"), Shape(str(rng.choice(QUESTION_COLOURS)), "square")]
    if rng.random() < 0.5:
        shapes.append(Shape(str(rng.choice(QUESTION_COLOURS)), "triangle"))
    while True:
        image, placed = _scene(rng, shapes, [_radius(rng, size) for _ in shapes], size)
        dx = placed[1][1] - placed[0][1]
        if abs(dx) >= 0.2 * size:
            break
    return Question(
        "leftof", "Is the circle left of the square?", (image,), "yes" if dx > 0 else "no", _THINKING["leftof"]
    )


def _match(rng: np.random.Generator, size: int) -> Question:
    target = Shape(str(rng.choice(QUESTION_COLOURS)), str(rng.choice(SHAPES)))
    if rng.random() < 0.5:  # the other image differs in colour, or in shape
        other = Shape(str(rng.choice([c for c in QUESTION_COLOURS if c != target.colour])), target.shape)
    else:
        other = Shape(target.colour, str(rng.choice([s for s in SHAPES if s != target.shape])))
    images = [_scene(rng, [s], [float(rng.uniform(0.18, 0.28)) * size], size)[0] for s in (target, other)]
    first = bool(rng.random() < 0.5)
    pair = (images[0], images[1]) if first else (images[1], images[0])
    return Question(
        "match", f"Which image shows a {target.text}? Answer 1 or 2.", pair, "1" if first else "2", _THINKING["match"]
    )


def _prefer(rng: np.random.Generator, size: int) -> Question:
    """A gold-labelled image pair (`mmalign.vlm.prefs`, ties redrawn); the thinking describes both images."""
    while True:
        caption = shapes_world.sample_captions(1, "train", rng)[0]
        scenes = [shapes_world.parse_caption(caption)]
        scenes.append(corrupt(scenes[0], rng))
        images = [shapes_world.render(s, rng, size) for s in scenes]
        gold = [shapes_world.gold_checks(im, caption)["score"] for im in images]
        if gold[0] != gold[1]:
            break
    order = [0, 1] if rng.random() < 0.5 else [1, 0]
    better = 1 + order.index(int(np.argmax(gold)))
    thinking = _THINKING["prefer"].format(first=scenes[order[0]].caption, second=scenes[order[1]].caption)
    return Question(
        "prefer", PAIR_QUESTION.format(prompt=caption), (images[order[0]], images[order[1]]), str(better), thinking
    )


def _arith(rng: np.random.Generator, size: int) -> Question:
    total = int(rng.integers(0, 10))  # answers uniform over 0–9
    a = int(rng.integers(0, total + 1))
    b = total - a
    shapes = [Shape(str(rng.choice(QUESTION_COLOURS)), str(rng.choice(SHAPES)))]
    image, _ = _scene(rng, shapes, [_radius(rng, size)], size)
    if rng.random() < 0.25:  # the answer never depends on the image, not even on a black one
        image = np.zeros_like(image)
    return Question("arith", f"What is {a}+{b}?", (image,), str(a + b), _THINKING["arith"].format(a=a, b=b))


_MAKERS = {"count": _count, "largest": _largest, "leftof": _leftof, "match": _match, "prefer": _prefer, "arith": _arith}
assert set(_MAKERS) == set(KINDS) and set(QUESTION_COLOURS) <= set(COLOURS)


def question(kind: str, seed: int, index: int, size: int = IMAGE_SIZE) -> Question:
    """The `index`-th question of `kind` from stream `seed` (deterministic)."""
    if kind not in KINDS:
        raise ValueError(f"unknown question kind {kind!r}; choose from {sorted(KINDS)}")
    return _MAKERS[kind](np.random.default_rng([seed, list(KINDS).index(kind), index]), size)


def question_set(kinds: list[str] | tuple[str, ...], per_kind: int, seed: int = HELDOUT_SEED) -> list[Question]:
    """`per_kind` questions of each kind, kinds interleaved."""
    return [question(k, seed, i) for i in range(per_kind) for k in kinds]


def mixed_stream(kinds: list[str] | tuple[str, ...], seed: int, index: int) -> Question:
    """The `index`-th question of a training stream cycling through `kinds` (seed must not be HELDOUT_SEED)."""
    if seed == HELDOUT_SEED:
        raise ValueError(f"seed {HELDOUT_SEED} is the held-out set's; train on another")
    return question(kinds[index % len(kinds)], seed, index // len(kinds))


@functools.lru_cache(maxsize=1)
def corpus() -> tuple[str, ...]:
    """Every question template and response piece, for training the world's tokenizer."""
    lines = [INSTRUCTION, "<think></think><answer></answer>", "yes no 0 1 2 3 4 5 6 7 8 9 +"]
    for kind in KINDS:
        for i in range(40):
            q = question(kind, 0, i)
            lines += [q.text, q.reference_response()]
    return tuple(lines)
