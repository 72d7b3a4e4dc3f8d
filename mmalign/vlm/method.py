"""What every VLM training method shares: loading the policy, its trainable state, held-out evaluation.

`VLMMethod` loads `model.path` (a hub name, a folder, or `embedded:vlm-shapes`) as a
`VisionLanguageModel`, with LoRA when `model.lora_rank` is set (else full fine-tuning), and
evaluates on the embedded VLM world's held-out questions (`HELDOUT_SEED`): greedy answers, exact
match, per kind, with the real images and with all-black images (the blind control: a model
that reads the image must lose accuracy on vision questions without it). The gold metric is
held-out accuracy, which no objective reads (the accuracy reward sees training questions only).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mmalign.config import ModelConfig, option
from mmalign.models.vlm import LoraSpec, VisionLanguageModel
from mmalign.registry import resolve_model_path
from mmalign.train.grids import image_grid
from mmalign.train.method import Evaluation, Method
from mmalign.vlm import world
from mmalign.vlm.rewards import accuracy_reward, format_reward
from mmalign.vlm.world import Question


@dataclass
class VLMWorldConfig:
    """Options every VLM method shares: which world questions to train on and how to evaluate."""

    kinds: list[str] = option("question kinds to train on (mmalign.vlm.world.KINDS)",
                              default_factory=lambda: list(world.KINDS))
    stream_seed: int = option("seed of the training question stream (never the held-out seed 7)", default=1000)
    max_new_tokens: int = option("longest completion, in tokens", default=40)
    eval_kinds: list[str] = option("held-out question kinds", default_factory=lambda: list(world.KINDS))
    eval_per_kind: int = option("held-out questions per kind", default=100)
    eval_batch_size: int = option("prompts decoded at once in evaluation", default=100)
    merge_lora: bool = option("save the final model with LoRA merged (else the adapter only)", default=True)


def load_vlm(model: ModelConfig, device: torch.device, reference_copy: bool = False) -> VisionLanguageModel:
    """The `model` section's VLM: LoRA when `lora_rank` is set (the reference is the adapter disabled),
    else full fine-tuning, with a frozen copy of the start when `reference_copy`."""
    lora = None
    if model.lora_rank:
        lora = LoraSpec(model.lora_rank, model.lora_alpha, model.lora_targets or LoraSpec.targets)
    return VisionLanguageModel.from_pretrained(
        resolve_model_path(model.path), lora=lora, reference_copy=lora is None and reference_copy,
        dtype=getattr(torch, model.dtype), device=device, revision=model.revision,
    )


@dataclass
class AnswerStats:
    """Greedy responses to a question set: accuracy and well-formed rate per question."""

    correct: list[float]
    formatted: list[float]
    responses: list[str] = field(repr=False)


class VLMMethod(Method):
    """Base of the VLM methods: subclasses add `config_class`, `compute_loss` and the data they train on."""

    config: VLMWorldConfig

    def needs_reference_copy(self) -> bool:
        """Whether full fine-tuning needs a frozen copy of the start (a KL to the reference)."""
        return False

    def setup(self, accelerator) -> None:
        self.device = accelerator.device
        self.num_processes, self.process_index = accelerator.num_processes, accelerator.process_index
        self.vlm = load_vlm(self.run.model, accelerator.device, self.needs_reference_copy())
        self.module: torch.nn.Module = self.vlm.model
        self.heldout = world.question_set(self.config.eval_kinds, self.config.eval_per_kind)

    # ------------------------------------------------------------------ trainable state
    def trainable_module(self) -> torch.nn.Module:
        return self.vlm.model

    # ------------------------------------------------------------------ evaluation
    def answer(self, questions: list[Question], blind: bool = False) -> AnswerStats:
        """Greedy responses of the current policy, scored by exact match and format."""
        responses: list[str] = []
        size = self.config.eval_batch_size
        for start in range(0, len(questions), size):
            chunk = questions[start : start + size]
            prompts = self.vlm.encode([q.conversation(blind=blind) for q in chunk])
            ids, mask = self.vlm.generate(prompts, max_new_tokens=self.config.max_new_tokens, do_sample=False)
            responses += self.vlm.decode(ids, mask)
        answers = [q.answer for q in questions]
        return AnswerStats(accuracy_reward(responses, answers), format_reward(responses, answers), responses)

    def gold_metric(self) -> str:
        return "heldout_accuracy"

    def evaluate(self, step: int) -> Evaluation:
        real, blind = self.answer(self.heldout), self.answer(self.heldout, blind=True)
        kinds = [q.kind for q in self.heldout]

        def mean(values: list[float], keep) -> float:
            chosen = [v for v, k in zip(values, kinds) if keep(k)]
            return float(np.mean(chosen)) if chosen else float("nan")

        metrics = {"heldout_accuracy": mean(real.correct, lambda k: True)}
        groups = {"vision": lambda k: world.KINDS[k], "text": lambda k: not world.KINDS[k]}
        groups.update({kind: (lambda k, kind=kind: k == kind) for kind in self.config.eval_kinds})
        for name, keep in groups.items():
            metrics[f"accuracy/{name}"] = mean(real.correct, keep)
            metrics[f"blind_accuracy/{name}"] = mean(blind.correct, keep)
        metrics["blind_accuracy/all"] = mean(blind.correct, lambda k: True)
        metrics["format_rate"] = mean(real.formatted, lambda k: True)
        metrics.update(self.response_metrics(real))
        return Evaluation({k: v for k, v in metrics.items() if v == v}, self._grid(real.responses))

    def response_metrics(self, real: AnswerStats) -> dict[str, float]:
        """Further held-out metrics computed from the greedy responses (listener shaping adds some)."""
        return {}

    def _grid(self, responses: list[str], count: int = 10) -> Image.Image:
        """The first held-out questions' first images with question, answer and response."""
        shown = self.heldout[:count]
        images = torch.stack([torch.from_numpy(q.images[0]) for q in shown]).permute(0, 3, 1, 2).float() / 255
        captions = [f"{q.text} [{q.answer}] → {r}" for q, r in zip(shown, responses)]
        return image_grid(images, captions, columns=5, cell=112, caption_lines=5)

    def report_description(self) -> str:
        c, rank = self.config, self.run.model.lora_rank
        return (
            f"Policy `{self.run.model.path}` ({f'LoRA rank {rank}' if rank else 'full fine-tuning'}), "
            f"trained on the VLM world's {', '.join(c.kinds)} questions (stream seed {c.stream_seed}). Evaluated on "
            f"{c.eval_per_kind} held-out questions per kind ({', '.join(c.eval_kinds)}; seed {world.HELDOUT_SEED}), "
            "greedy, exact match of the `<answer>` block; `blind_accuracy` shows all-black images instead."
        )

    def save_final(self, directory: Path) -> list[str]:
        files = self.vlm.save_pretrained(directory / "model", merged=self.config.merge_lora)
        return [f"model/{name}" for name in files]
