"""Supervised fine-tuning of a VLM on the embedded world's reference responses (`method: vlm-sft`).

Each item is a world question; the target is its `reference_response()`
(`<think>…</think><answer>…</answer>` followed by the end-of-turn token). The loss is the
token-mean negative log-likelihood of the target given the chat prompt and its images; the prompt
is not supervised. This is the warm start RL methods begin from (`scripts/train_vlm_warmstart.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmalign.losses import aggregate_tokens
from mmalign.models.vlm import PromptBatch
from mmalign.vlm import world
from mmalign.vlm.method import VLMMethod, VLMWorldConfig
from mmalign.vlm.world import Question


@dataclass
class VLMSFTConfig(VLMWorldConfig):
    """Options of `vlm-sft` (section `vlm_sft`)."""


class QuestionStream(torch.utils.data.Dataset):
    """`length` questions of the world's training stream, cycling through `kinds`."""

    def __init__(self, kinds: list[str], seed: int, length: int = 10**6):
        self.kinds, self.seed, self.length = kinds, seed, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Question:
        return world.mixed_stream(self.kinds, self.seed, index)


class VLMSFT(VLMMethod):
    config_class = VLMSFTConfig
    config: VLMSFTConfig

    def train_dataset(self) -> torch.utils.data.Dataset:
        return QuestionStream(self.config.kinds, self.config.stream_seed)

    def collate(self, items: list[Question]) -> list[Question]:
        return items

    def compute_loss(self, batch: list[Question], step: int, micro: int):
        prompts: PromptBatch = self.vlm.encode([q.conversation() for q in batch])
        ids, mask = self.vlm.completion_tokens([q.reference_response() for q in batch])
        logp, _ = self.vlm.token_logprobs(prompts, ids, mask, model=self.module)
        loss = -aggregate_tokens(logp, mask, "token")
        return loss, {"target_tokens": mask.sum(1).float().mean()}
