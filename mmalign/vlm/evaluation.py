"""Held-out evaluation of a VLM on questions: `QuestionEvaluator` (the `Evaluator` of the VLM methods).

Greedy answers to the held-out questions of a `PromptSource`, with the real images and with
all-black images (the blind control: a model that reads the image must lose accuracy on vision
questions without it), scored by the method's reward functions: `heldout_reward` is their weighted
sum, `heldout/<name>` each one's mean, `blind_reward` the sum under black images. On the embedded
world the gold metric is `heldout_accuracy` (exact match, also per kind and vision / text), which
no objective reads; on a user's set it is `heldout_reward`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmalign.models.vlm import VisionLanguageModel
from mmalign.train.grids import image_grid
from mmalign.train.method import Evaluation
from mmalign.vlm import world
from mmalign.vlm.data import PromptSource, WorldPrompts
from mmalign.vlm.rewards import RewardTerm, accuracy_reward, format_reward, weighted_rewards


@dataclass
class AnswerStats:
    """Greedy responses to a question set and their scores."""

    responses: list[str] = field(repr=False)
    correct: list[float]  # exact match of the answer block
    formatted: list[float]
    reward: torch.Tensor  # (N,) weighted total of the reward functions
    parts: dict[str, torch.Tensor]  # each function's raw values (N,)


class QuestionEvaluator:
    """Scores the current `vlm` on `source.heldout` (see the module doc); `extra_metrics` adds
    method-specific metrics computed from the real-image responses."""

    def __init__(
        self,
        vlm: VisionLanguageModel,
        source: PromptSource,
        rewards: Sequence[RewardTerm],
        max_new_tokens: int,
        batch_size: int,
        extra_metrics: Callable[[AnswerStats], dict[str, float]] | None = None,
    ):
        self.vlm, self.source, self.rewards = vlm, source, list(rewards)
        self.max_new_tokens, self.batch_size, self.extra_metrics = max_new_tokens, batch_size, extra_metrics
        self.heldout = source.heldout

    @property
    def on_world(self) -> bool:
        return isinstance(self.source, WorldPrompts)

    @property
    def gold_metric(self) -> str:
        return "heldout_accuracy" if self.on_world else "heldout_reward"

    def answer(self, questions: list[Any], blind: bool = False) -> AnswerStats:
        """Greedy responses of the current policy, scored by exact match, format and the reward functions."""
        responses: list[str] = []
        for start in range(0, len(questions), self.batch_size):
            chunk = questions[start : start + self.batch_size]
            prompts = self.vlm.encode([q.conversation(blind=blind) for q in chunk])
            ids, mask = self.vlm.generate(prompts, max_new_tokens=self.max_new_tokens, do_sample=False)
            responses += self.vlm.decode(ids, mask)
        answers = [q.answer for q in questions]
        reward, parts = weighted_rewards(self.rewards, responses, answers)
        return AnswerStats(
            responses, accuracy_reward(responses, answers), format_reward(responses, answers), reward, parts
        )

    def evaluate(self, step: int) -> Evaluation:
        real, blind = self.answer(self.heldout), self.answer(self.heldout, blind=True)
        metrics = {"heldout_reward": real.reward.mean().item(), "blind_reward": blind.reward.mean().item()}
        metrics.update({f"heldout/{name}": values.mean().item() for name, values in real.parts.items()})
        if self.on_world:
            metrics.update(self.world_metrics(real, blind))
        metrics["format_rate"] = float(np.mean(real.formatted))
        if self.extra_metrics is not None:
            metrics.update(self.extra_metrics(real))
        return Evaluation({k: v for k, v in metrics.items() if v == v}, self.grid(real.responses))

    def world_metrics(self, real: AnswerStats, blind: AnswerStats) -> dict[str, float]:
        """Exact-match accuracy on the world's held-out questions: overall, vision / text and per kind."""
        kinds = [q.kind for q in self.heldout]

        def mean(values: list[float], keep) -> float:
            chosen = [v for v, k in zip(values, kinds) if keep(k)]
            return float(np.mean(chosen)) if chosen else float("nan")

        metrics = {"heldout_accuracy": mean(real.correct, lambda k: True)}
        groups = {"vision": lambda k: world.KINDS[k], "text": lambda k: not world.KINDS[k]}
        groups.update({kind: (lambda k, kind=kind: k == kind) for kind in dict.fromkeys(kinds)})
        for name, keep in groups.items():
            metrics[f"accuracy/{name}"] = mean(real.correct, keep)
            metrics[f"blind_accuracy/{name}"] = mean(blind.correct, keep)
        metrics["blind_accuracy/all"] = mean(blind.correct, lambda k: True)
        return metrics

    def grid(self, responses: list[str], count: int = 10, cell: int = 112) -> Image.Image:
        """The first held-out questions' first images with question, answer and response."""
        shown = self.heldout[:count]
        tiles = []
        for q in shown:
            first = q.images[0] if q.images else np.zeros((cell, cell, 3), np.uint8)
            image = first if isinstance(first, Image.Image) else Image.fromarray(first)
            tiles.append(torch.from_numpy(np.array(image.convert("RGB").resize((cell, cell)))))
        images = torch.stack(tiles).permute(0, 3, 1, 2).float() / 255
        captions = [f"{q.text} [{q.answer}] → {r}" for q, r in zip(shown, responses)]
        return image_grid(images, captions, columns=5, cell=cell, caption_lines=5)
