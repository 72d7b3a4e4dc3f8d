"""What every VLM question method shares: loading the policy, the questions, held-out evaluation.

`VLMMethod` loads `model.path` (a hub name, a folder, or `embedded:vlm-shapes`) as a
`VisionLanguageModel`, with LoRA when `model.lora_rank` is set (else full fine-tuning), and the
questions of `data` (`mmalign.vlm.data`: the embedded VLM world or the user's set). Evaluation
decodes greedy answers to the held-out questions, with the real images and with all-black images
(the blind control: a model that reads the image must lose accuracy on vision questions without
it), and scores them with the method's reward functions (`rewards`): `heldout_reward` is their
weighted sum, `heldout/<name>` each one's mean. On the world, the gold metric is
`heldout_accuracy` (exact match, per kind too), which no objective reads (the accuracy reward
sees training questions only); on a user's set it is `heldout_reward`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mmalign.config import VLMModelConfig, option
from mmalign.models.vlm import LoraSpec, VisionLanguageModel
from mmalign.registry import resolve_model_path
from mmalign.train.grids import image_grid
from mmalign.train.method import Evaluation, Method
from mmalign.vlm import world
from mmalign.vlm.data import VQADataConfig, WorldPrompts, load_prompt_source
from mmalign.vlm.rewards import RewardTerm, accuracy_reward, format_reward, weighted_rewards


@dataclass
class VLMConfig:
    """Options every VLM question method shares: decoding, evaluation and the reward functions."""

    max_new_tokens: int = option("longest completion, in tokens", default=40)
    eval_batch_size: int = option("prompts decoded at once in evaluation", default=100)
    merge_lora: bool = option("save the final model with LoRA merged (else the adapter only)", default=True)
    rewards: list[RewardTerm] = option(
        "weighted reward functions, total r = Σ weight·f: the training reward of the RL methods and the "
        "held-out metrics of every method (built-ins: accuracy, format, numeric, choice, math; or "
        "package.module:function)",
        default_factory=lambda: [RewardTerm("accuracy", 0.9), RewardTerm("format", 0.1)],
    )


def load_vlm(model: VLMModelConfig, device: torch.device, reference_copy: bool = False) -> VisionLanguageModel:
    """The `model` section's VLM: LoRA when `lora_rank` is set (the reference is the adapter disabled),
    else full fine-tuning, with a frozen copy of the start when `reference_copy`."""
    lora = None
    if model.lora_rank:
        lora = LoraSpec(model.lora_rank, model.lora_alpha, model.lora_targets or LoraSpec.targets)
    return VisionLanguageModel.from_pretrained(
        resolve_model_path(model.path),
        lora=lora,
        reference_copy=lora is None and reference_copy,
        dtype=getattr(torch, model.dtype),
        device=device,
        revision=model.revision,
    )


@dataclass
class AnswerStats:
    """Greedy responses to a question set and their scores."""

    responses: list[str] = field(repr=False)
    correct: list[float]  # exact match of the answer block
    formatted: list[float]
    reward: torch.Tensor  # (N,) weighted total of the method's reward functions
    parts: dict[str, torch.Tensor]  # each function's raw values (N,)


class VLMMethod(Method):
    """Base of the VLM question methods: subclasses add `config_class`, `compute_loss` and how they train."""

    model_config_class = VLMModelConfig
    data_config_class = VQADataConfig
    config: VLMConfig

    def needs_reference_copy(self) -> bool:
        """Whether full fine-tuning needs a frozen copy of the start (a KL to the reference)."""
        return False

    def setup(self, accelerator) -> None:
        self.device = accelerator.device
        self.source = load_prompt_source(self.run.data, self.run.seed)
        self.heldout = self.source.heldout
        self.vlm = load_vlm(self.run.model, accelerator.device, self.needs_reference_copy())
        self.policy = self.vlm
        self.module: torch.nn.Module = self.vlm.model

    @property
    def on_world(self) -> bool:
        return isinstance(self.source, WorldPrompts)

    # ------------------------------------------------------------------ evaluation
    def answer(self, questions: list[Any], blind: bool = False) -> AnswerStats:
        """Greedy responses of the current policy, scored by exact match, format and the reward functions."""
        responses: list[str] = []
        size = self.config.eval_batch_size
        for start in range(0, len(questions), size):
            chunk = questions[start : start + size]
            prompts = self.vlm.encode([q.conversation(blind=blind) for q in chunk])
            ids, mask = self.vlm.generate(prompts, max_new_tokens=self.config.max_new_tokens, do_sample=False)
            responses += self.vlm.decode(ids, mask)
        answers = [q.answer for q in questions]
        reward, parts = weighted_rewards(self.config.rewards, responses, answers)
        return AnswerStats(
            responses, accuracy_reward(responses, answers), format_reward(responses, answers), reward, parts
        )

    def gold_metric(self) -> str:
        return "heldout_accuracy" if self.on_world else "heldout_reward"

    def evaluate(self, step: int) -> Evaluation:
        real, blind = self.answer(self.heldout), self.answer(self.heldout, blind=True)
        metrics = {"heldout_reward": real.reward.mean().item(), "blind_reward": blind.reward.mean().item()}
        metrics.update({f"heldout/{name}": values.mean().item() for name, values in real.parts.items()})
        if self.on_world:
            metrics.update(self.world_metrics(real, blind))
        metrics["format_rate"] = float(np.mean(real.formatted))
        metrics.update(self.response_metrics(real))
        return Evaluation({k: v for k, v in metrics.items() if v == v}, self._grid(real.responses))

    def world_metrics(self, real: AnswerStats, blind: AnswerStats) -> dict[str, float]:
        """Exact-match accuracy on the world's held-out questions: overall, vision / text and per kind."""
        kinds = [q.kind for q in self.heldout]

        def mean(values: list[float], keep) -> float:
            chosen = [v for v, k in zip(values, kinds) if keep(k)]
            return float(np.mean(chosen)) if chosen else float("nan")

        metrics = {"heldout_accuracy": mean(real.correct, lambda k: True)}
        groups = {"vision": lambda k: world.KINDS[k], "text": lambda k: not world.KINDS[k]}
        groups.update({kind: (lambda k, kind=kind: k == kind) for kind in self.run.data.embedded.eval_kinds})
        for name, keep in groups.items():
            metrics[f"accuracy/{name}"] = mean(real.correct, keep)
            metrics[f"blind_accuracy/{name}"] = mean(blind.correct, keep)
        metrics["blind_accuracy/all"] = mean(blind.correct, lambda k: True)
        return metrics

    def response_metrics(self, real: AnswerStats) -> dict[str, float]:
        """Further held-out metrics computed from the greedy responses (listener shaping adds some)."""
        return {}

    def _grid(self, responses: list[str], count: int = 10, cell: int = 112) -> Image.Image:
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

    def data_used(self) -> dict[str, Any]:
        return self.source.describe()

    def report_description(self) -> str:
        rank = self.run.model.lora_rank
        used = self.source.describe()
        terms = " + ".join(f"{t.weight:g}·{t.name}" for t in self.config.rewards)
        if self.on_world:
            trained = (
                f"the VLM world's {', '.join(used['train']['kinds'])} questions (stream seed "
                f"{used['train']['stream_seed']}). Evaluated on {used['eval']['per_kind']} held-out questions "
                f"per kind ({', '.join(used['eval']['kinds'])}; seed {world.HELDOUT_SEED})"
            )
        else:
            held = used["eval"]
            where = (
                f"{held['held_out_rows']} rows held out of that split (seed {held['holdout_seed']})"
                if "held_out_rows" in held
                else f"`{held['path']}` split `{held['split']}` ({held['rows']} rows)"
            )
            trained = f"`{used['path']}` split `{used['split']}` ({used['train_rows']} rows). Evaluated on {where}"
        return (
            f"Policy `{self.run.model.path}` ({f'LoRA rank {rank}' if rank else 'full fine-tuning'}), trained on "
            f"{trained}: greedy decoding, rewards {terms}; `blind_*` metrics show all-black images instead."
        )

    def save_final(self, directory: Path) -> list[str]:
        return self.vlm.save(directory, merged=self.config.merge_lora)
