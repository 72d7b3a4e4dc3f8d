"""The `Method` interface: what a training method gives the shared `Trainer`.

A method turns a batch into a loss and metrics, evaluates its model, and saves its result.
Everything else (devices, accumulation, clipping, mixed precision, checkpoints, resume, logs,
progress bars, reports) is the trainer's job. Offline methods return a dataset; online methods
may instead override `next_batch` to produce batches from the current policy.

A new method sets:

- `config_class`: the dataclass of its own section (named after the method, `grpo:` for `grpo`);
- `model_config_class`, `data_config_class`, `eval_config_class`: the dataclass of each shared
  section it reads, or None for a section it does not have. Keys outside these classes are
  config errors naming the key, and `mmalign train --help METHOD` lists exactly these options;

and overrides `setup`, `compute_loss` (the objective: the maths of the method) and `save_final`,
plus `train_dataset`/`collate` (offline) or `next_batch` (online; `mmalign.train.rollouts`
schedules rollouts), and `after_optimizer_step` to update moving averages of its weights.
`setup` sets the parts the Trainer reaches through the method: the `policy`
(a `Policy`: `DiffusionModel`, `VisionLanguageModel`; a method that trains its own network
overrides `trainable_module` instead) and the `evaluator` (an `Evaluator`; or overrides of
`evaluate` and `gold_metric`). `data_used` and `report_description` say in the report what the
run really read.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch
from PIL import Image

from mmalign.config import EvalSchedule, RunConfig
from mmalign.models.state import load_trainable_state, trainable_state


@dataclass
class Evaluation:
    """One evaluation: scalar metrics (gold metric first) and an optional sample grid."""

    metrics: dict[str, float]
    grid: Image.Image | None = None
    details: dict[str, Any] = field(default_factory=dict)
    #: video methods: the grid's frames, written as an animated GIF beside the PNG, and their rate
    animation: list[Image.Image] | None = None
    fps: float = 8.0


class RunSections:
    """What the config loader reads off a method's class: `config_class` (its own section) and the
    dataclass of each shared section it reads (None: it has no such section)."""

    config_class: ClassVar[type]
    model_config_class: ClassVar[type | None] = None
    data_config_class: ClassVar[type | None] = None
    eval_config_class: ClassVar[type | None] = EvalSchedule

    def __init__(self, run: RunConfig):
        self.run = run
        self.config = run.method_args


class Policy(Protocol):
    """The trainable model of a run, shared by every method on that kind of model (`DiffusionModel`,
    `VisionLanguageModel`): what it trains, its trainable state for checkpoints. A method that sets
    `self.policy` in `setup` gets `trainable_module` and the checkpoint state from it."""

    def trainable_module(self) -> torch.nn.Module:
        """The module holding the trainable parameters (unwrapped)."""

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable weights by name (LoRA matrices, or every trained weight), detached on CPU."""

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore weights written by `trainable_state_dict`; a mismatch of names is an error."""


class Evaluator(Protocol):
    """Held-out evaluation of a run's current model: metrics (the gold metric among them), a sample
    grid and files (`DiffusionEvaluator`, `VideoEvaluator`, `QuestionEvaluator`). A method that sets
    `self.evaluator` in `setup` gets `evaluate` and `gold_metric` from it."""

    @property
    def gold_metric(self) -> str:
        """The metric reported as `gold_metric`."""

    def evaluate(self, step: int) -> Evaluation:
        """Measure the current model at optimizer step `step`."""


class Method(RunSections, ABC):
    """Base class of every training method run by the `Trainer` (see the module doc)."""

    policy: Policy | None = None
    evaluator: Evaluator | None = None

    @abstractmethod
    def setup(self, accelerator) -> None:
        """Load models and data onto `accelerator.device`."""

    def _part(self, name: str, instead: str) -> Any:
        """The part `setup` set as `self.<name>`; a method that sets none must override `instead`."""
        part = getattr(self, name)
        if part is None:
            raise TypeError(f"{type(self).__name__}.setup sets no {name}: set self.{name} or override {instead}")
        return part

    def trainable_module(self) -> torch.nn.Module:
        """The module holding the trainable parameters (the trainer prepares it with accelerate); the
        policy's by default."""
        return self._part("policy", "trainable_module").trainable_module()

    def set_trainable_module(self, module: torch.nn.Module) -> None:
        """Receive the prepared (possibly DDP-wrapped) module to call in `compute_loss` (kept as `self.module`)."""
        self.module = module

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Trainable weights by name, for checkpoints: the policy's, else the parameters of
        `trainable_module()` that require grad. Under FSDP every process calls it and the main process
        gets the whole tensors (`mmalign.models.state.trainable_state`)."""
        if self.policy is not None:
            return self.policy.trainable_state_dict()
        return trainable_state(self.trainable_module())

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Restore weights written by `trainable_state_dict`."""
        if self.policy is not None:
            self.policy.load_trainable_state_dict(state)
        else:
            load_trainable_state(self.trainable_module(), state)

    def train_dataset(self) -> torch.utils.data.Dataset | None:
        """The dataset offline methods train on; None for online methods."""
        return None

    def collate(self, items: list[Any]) -> Any:
        return torch.utils.data.default_collate(items)

    def next_batch(self, step: int, micro: int) -> Any:
        """Online methods: produce the batch for `(step, micro)` from the current policy."""
        raise RuntimeError(f"{type(self).__name__} has no dataset and does not produce batches")

    def after_optimizer_step(self, step: int) -> None:
        """Called after optimizer step `step` (counted from 1), before logging, evaluation and checkpoints:
        where a method updates moving averages of its weights."""

    @abstractmethod
    def compute_loss(self, batch: Any, step: int, micro: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss (a scalar with a graph) and detached scalar metrics for one micro-batch."""

    def evaluate(self, step: int) -> Evaluation:
        """Measure the current model: the evaluator's evaluation by default. Called on the main process,
        and under FSDP on every process (a sharded forward needs them all)."""
        return self._part("evaluator", "evaluate").evaluate(step)

    @abstractmethod
    def save_final(self, directory: Path) -> list[str]:
        """Write the trained result into `directory`; return the paths written (relative). Under FSDP every
        process calls it (the trainable module's `state_dict()` then gathers whole tensors); the main
        process's directory is kept."""

    def gold_metric(self) -> str:
        """Name of the metric reported as `gold_metric`: the evaluator's by default."""
        return self._part("evaluator", "gold_metric").gold_metric

    def data_used(self) -> dict[str, Any]:
        """What the run trained and evaluated on, for `report.json` (`{"path": …}` and whatever else
        identifies it: splits, row counts)."""
        return {"path": self.run.data.path} if self.run.data is not None else {}

    def report_description(self) -> str:
        """What the run report says was trained and how it was evaluated (markdown, one paragraph)."""
        model = f"Model `{self.run.model.path}`. " if self.run.model is not None else ""
        data = f"Data `{self.run.data.path}`." if self.run.data is not None else ""
        return model + data
