"""Supervised fine-tuning of a VLM on target responses (`method: vlm-sft`).

Each item is a question of `data` (`mmalign.vlm.data`); the target is its `reference_response()`
followed by the end-of-turn token: the world's `<think>…</think><answer>…</answer>`, or the
`response` column (`data.columns.response`) of a user's set. The loss is the
token-mean negative log-likelihood of the target given the chat prompt and its images; the prompt
is not supervised. This is the warm start RL methods begin from (`scripts/train_vlm_warmstart.py`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mmalign.losses import aggregate_tokens
from mmalign.models.vlm import PromptBatch
from mmalign.vlm.data import SFTDataConfig, WorldPrompts
from mmalign.vlm.method import VLMConfig, VLMMethod


@dataclass
class VLMSFTConfig(VLMConfig):
    """Options of `vlm-sft` (section `vlm_sft`)."""


class QuestionStream(torch.utils.data.Dataset):
    """The first `length` questions of the world's endless training stream (the trainer draws from them in
    its own seeded order)."""

    def __init__(self, source: WorldPrompts, length: int = 10**6):
        self.source, self.length = source, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        return self.source.item(index)


class VLMSFT(VLMMethod):
    config_class = VLMSFTConfig
    data_config_class = SFTDataConfig
    config: VLMSFTConfig

    def setup(self, accelerator) -> None:
        super().setup(accelerator)
        if not self.on_world:
            self.source.train.check([self.run.data.columns.response])

    def train_dataset(self) -> torch.utils.data.Dataset:
        return QuestionStream(self.source) if self.on_world else self.source.train

    def collate(self, items: list[Any]) -> list[Any]:
        return items

    def compute_loss(self, batch: list[Any], step: int, micro: int):
        prompts: PromptBatch = self.vlm.encode([q.conversation() for q in batch])
        ids, mask = self.vlm.completion_tokens([q.reference_response() for q in batch])
        logp, _ = self.vlm.token_logprobs(prompts, ids, mask, model=self.module)
        loss = -aggregate_tokens(logp, mask, "token")
        return loss, {"target_tokens": mask.sum(1).float().mean()}
