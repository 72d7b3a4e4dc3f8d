"""Batches of online methods: rollouts of the current policy on a deterministic prompt stream.

An online method (GRPO and its variants; a diffusion RL method the same way) rolls its current
policy out on prompts instead of reading a dataset. `RolloutSchedule` fixes which prompts a
micro-batch uses and when a rollout is made or reused:

- optimizer step `s`, micro-batch `m` belongs to rollout `r = (s // μ) · A + m` (μ = `iterations`,
  the optimizer steps each rollout serves; A = `train.gradient_accumulation_steps`);
- rollout `r` uses prompts `r · B … r · B + B − 1` of the stream (B = `train.batch_size`), this
  process the slice `[p · B/N, (p + 1) · B/N)` of them (N processes, index p), so N processes roll
  out exactly the prompts one process would;
- a rollout is made at the first step of its μ and reused for the others.

The stream is a function of the prompt index (`prompt_at`), so any process and a resumed run draw
the same prompts; a resumed run is exact when checkpoints fall on rollout boundaries (`check`),
since sampling draws from the global RNG the trainer checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from mmalign.config import ConfigError, TrainConfig

Prompt = TypeVar("Prompt")
Batch = TypeVar("Batch")


@dataclass(frozen=True)
class RolloutSchedule:
    """Which prompts each (step, micro-batch) rolls out on this process (see the module doc)."""

    batch_size: int
    accumulation: int
    iterations: int
    num_processes: int = 1
    process_index: int = 0

    @classmethod
    def of_run(
        cls, train: TrainConfig, iterations: int, num_processes: int, process_index: int, section: str
    ) -> RolloutSchedule:
        """The schedule of a run; refuses checkpoints that would cut a rollout's μ steps (named `section`)."""
        if iterations < 1:
            raise ConfigError(f"{section}.iterations must be at least 1, got {iterations}")
        if iterations > 1 and train.checkpoint_every % iterations:
            raise ConfigError(
                f"train.checkpoint_every={train.checkpoint_every} must be a multiple of {section}.iterations="
                f"{iterations}"
            )
        return cls(train.batch_size, train.gradient_accumulation_steps, iterations, num_processes, process_index)

    def prompt_indices(self, step: int, micro: int) -> range:
        """This process's prompt indices of the rollout that serves optimizer step `step`, micro-batch `micro`."""
        per_process = self.batch_size // self.num_processes
        rollout = (step // self.iterations) * self.accumulation + micro
        first = rollout * self.batch_size + self.process_index * per_process
        return range(first, first + per_process)

    def is_fresh(self, step: int) -> bool:
        """Whether step `step` makes new rollouts (the first of their μ steps)."""
        return step % self.iterations == 0


class RolloutSource(Generic[Prompt, Batch]):
    """Online batches: `batch(step, micro)` rolls the policy out (`rollout(prompts)`) on the schedule's
    prompts (`prompt_at(index)`), or returns the rollout made for the same micro-batch earlier in its μ."""

    def __init__(
        self,
        schedule: RolloutSchedule,
        prompt_at: Callable[[int], Prompt],
        rollout: Callable[[list[Prompt]], Batch],
    ):
        self.schedule, self.prompt_at, self.rollout = schedule, prompt_at, rollout
        self._made: dict[int, Batch] = {}

    def prompts(self, step: int, micro: int) -> list[Prompt]:
        return [self.prompt_at(i) for i in self.schedule.prompt_indices(step, micro)]

    def batch(self, step: int, micro: int) -> Batch:
        if self.schedule.is_fresh(step) or micro not in self._made:
            self._made[micro] = self.rollout(self.prompts(step, micro))
        return self._made[micro]
