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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmalign.config import ConfigError, VLMModelConfig, check_range, option
from mmalign.models.vlm import LoraSpec, VisionLanguageModel
from mmalign.registry import resolve_model_path
from mmalign.train.method import Method
from mmalign.vlm.data import VQADataConfig, load_prompt_source
from mmalign.vlm.evaluation import AnswerStats, QuestionEvaluator
from mmalign.vlm.rewards import RewardTerm


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

    def check_values(self, prefix: str) -> None:
        """Ranges, and each reward function given once, checked when the config is built."""
        check_range(f"{prefix}max_new_tokens", self.max_new_tokens, 1)
        check_range(f"{prefix}eval_batch_size", self.eval_batch_size, 1)
        names = [term.name for term in self.rewards]
        if twice := sorted({name for name in names if names.count(name) > 1}):
            raise ConfigError(f"config key '{prefix}rewards' lists reward function {twice[0]!r} twice; give it once")


def load_vlm(model: VLMModelConfig, device: torch.device, reference_copy: bool = False) -> VisionLanguageModel:
    """The `model` section's VLM, ready to train (`VisionLanguageModel.prepare_training`): LoRA when
    `lora_rank` is set (the reference is the adapter disabled), else full fine-tuning, with a frozen copy
    of the start when `reference_copy`."""
    lora = None
    if model.lora_rank:
        lora = LoraSpec(model.lora_rank, model.lora_alpha, model.lora_targets or LoraSpec.targets)
    vlm = VisionLanguageModel.from_pretrained(
        resolve_model_path(model.path),
        lora=lora,
        reference_copy=lora is None and reference_copy,
        dtype=getattr(torch, model.dtype),
        device=device,
        revision=model.revision,
        allow_pickle=model.allow_pickle,
    )
    vlm.prepare_training(model.gradient_checkpointing)
    return vlm


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
        c = self.config
        self.evaluator = QuestionEvaluator(self.vlm, self.source, c.rewards, c.max_new_tokens, c.eval_batch_size,
                                           self.response_metrics)  # fmt: skip

    @property
    def on_world(self) -> bool:
        return self.evaluator.on_world

    def response_metrics(self, real: AnswerStats) -> dict[str, float]:
        """Further held-out metrics computed from the greedy responses (listener shaping adds some)."""
        return {}

    def data_used(self) -> dict[str, Any]:
        return self.source.describe()

    def report_description(self) -> str:
        rank = self.run.model.lora_rank
        terms = " + ".join(f"{t.weight:g}·{t.name}" for t in self.config.rewards)
        return (
            f"Policy `{self.run.model.path}` ({f'LoRA rank {rank}' if rank else 'full fine-tuning'}), trained on "
            f"{self.source.summary()}: greedy decoding, rewards {terms}; `blind_*` metrics show all-black images "
            "instead."
        )

    def save_final(self, directory: Path) -> list[str]:
        return self.vlm.save(directory, merged=self.config.merge_lora)
