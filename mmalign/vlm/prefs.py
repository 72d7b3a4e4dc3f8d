"""Image-preference pairs of the embedded shapes world, labelled by its gold metric.

Each pair shows one caption rendered twice: once as written, once with one thing changed (an
object's colour or shape, the relation, or an object left out). The world's programmatic gold
metric (`shapes_world.gold_checks`) scores both renders against the caption; the higher score
wins, equal scores are a tie (label 0.5). Which render comes first is random. Training pairs use
the world's `train` captions, evaluation pairs its `heldout` captions (never trained on).

The pairs feed the VLM reward models (score each image with the prompt) and listener-shaped GRPO
(show both images, ask which one matches).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image

from mmalign.data import shapes_world
from mmalign.data.shapes_world import COLOURS, RELATIONS, SHAPES, Scene, Shape
from mmalign.models.vlm import Conversation

IMAGE_SIZE = 56
PAIR_QUESTION = "Which image shows {prompt} better? Answer 1 or 2."
SCORE_PROMPT = "Image generated for: {prompt}"


@dataclass(frozen=True)
class ImagePair:
    """Two renders `(H, W, 3)` uint8 for `prompt`; `label` 1 or 2 names the better one, 0.5 a tie."""

    prompt: str
    image_1: np.ndarray
    image_2: np.ndarray
    label: float
    gold: tuple[float, float]

    def scoring_conversation(self, which: int) -> Conversation:
        """One image with its prompt, as a reward model scores it."""
        return score_conversation(self.image_1 if which == 1 else self.image_2, self.prompt)

    def comparison_conversation(self, system: str | None = None) -> Conversation:
        """Both images and the question which one matches the prompt better."""
        content = [
            {"type": "image"},
            {"type": "image"},
            {"type": "text", "text": PAIR_QUESTION.format(prompt=self.prompt)},
        ]
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
        return Conversation(messages, [Image.fromarray(self.image_1), Image.fromarray(self.image_2)], "image pair")


def score_conversation(
    image: Image.Image | np.ndarray | str | Path, prompt: str, source: str = "sample"
) -> Conversation:
    """The chat a VLM reward model reads to score one image (a picture or a file) for one prompt."""
    picture = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    content = [{"type": "image"}, {"type": "text", "text": SCORE_PROMPT.format(prompt=prompt)}]
    return Conversation([{"role": "user", "content": content}], [picture], source)


def corrupt(scene: Scene, rng: np.random.Generator) -> Scene:
    """The scene with one thing changed: a colour, a shape, the relation, or (pairs) an object dropped."""
    objects = list(scene.objects)
    i = int(rng.integers(len(objects)))
    choices = ["colour", "shape"] + (["relation", "drop"] if len(objects) == 2 else [])
    change = str(rng.choice(choices))
    if change == "colour":
        objects[i] = Shape(str(rng.choice([c for c in COLOURS if c != objects[i].colour])), objects[i].shape)
    elif change == "shape":
        objects[i] = Shape(objects[i].colour, str(rng.choice([s for s in SHAPES if s != objects[i].shape])))
    elif change == "relation":
        return replace(scene, relation=str(rng.choice([r for r in RELATIONS if r != scene.relation])))
    else:
        return Scene((objects[i],))
    return replace(scene, objects=tuple(objects))


def image_pairs(split: str, n: int, seed: int = 0, size: int = IMAGE_SIZE) -> list[ImagePair]:
    """`n` gold-labelled pairs for captions of `split` ("train" or "heldout"), deterministic in `seed`."""
    pairs = []
    for i in range(n):  # one generator per pair: the first k pairs do not depend on n
        rng = np.random.default_rng([seed, 0 if split == "train" else 1, i])
        (caption,) = shapes_world.sample_captions(1, split, rng)
        scene = shapes_world.parse_caption(caption)
        good = shapes_world.render(scene, rng, size)
        bad = shapes_world.render(corrupt(scene, rng), rng, size)
        gold = (shapes_world.gold_checks(good, caption)["score"], shapes_world.gold_checks(bad, caption)["score"])
        if rng.random() < 0.5:
            good, bad, gold = bad, good, (gold[1], gold[0])
        label = 1.0 if gold[0] > gold[1] else 2.0 if gold[1] > gold[0] else 0.5
        pairs.append(ImagePair(caption, good, bad, label, gold))
    return pairs
