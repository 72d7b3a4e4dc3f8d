"""GRPO on a VLM (`method: grpo`): group sampling, group-normalised advantages, clipped ratio, k3 KL.

Every optimizer step (per micro-batch), `train.batch_size` prompts of the training stream
(`mmalign.vlm.data`: the embedded world's or the user's set) are each sampled `num_generations`
times with the current policy at `temperature`, scored by the weighted verifiable rewards
(`rewards`), and turned into advantages within each group (`mmalign.losses.group_advantages`). The
loss is `mmalign.losses.grpo_loss`. A rollout is reused for `iterations` consecutive optimizer steps
(μ); its `logp_old` is computed once, with the weights that sampled it, so the ratio is exactly 1 at
the first inner step (with μ = 1 no extra forward is spent: `logp_old` is the detached policy
log-prob, as in TRL). With `beta > 0` the reference is the model with its LoRA adapter disabled, or a
frozen copy under full fine-tuning.

Prompts, rollout reuse and resume follow `mmalign.train.rollouts` (checkpoints must fall on
rollout boundaries: `checkpoint_every` a multiple of `iterations`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from mmalign.config import ConfigError, check_choice, check_range, option
from mmalign.losses import AGGREGATIONS, group_advantages, grpo_loss
from mmalign.models.vlm import Rollout
from mmalign.train.rollouts import RolloutSchedule, RolloutSource
from mmalign.vlm.method import VLMConfig, VLMMethod
from mmalign.vlm.rewards import weighted_rewards


@dataclass
class GRPOConfig(VLMConfig):
    """Options of `grpo` (section `grpo`); `train.batch_size` counts prompts per micro-batch."""

    num_generations: int = option("completions sampled per prompt (the group size G)", default=8)
    temperature: float = option("sampling temperature; log-probs use the same", default=1.0)
    top_p: float = option("nucleus sampling threshold", default=1.0)
    iterations: int = option("optimizer steps per rollout (μ); >1 makes the clip matter", default=1)
    clip_low: float = option("ε_low of the ratio clip", default=0.2)
    clip_high: float = option("ε_high of the ratio clip (DAPO's clip-higher: 0.28)", default=0.28)
    beta: float = option("weight of the k3 KL to the reference (0 = no reference)", default=0.0)
    aggregation: str = option(f"per-token loss reduction: {', '.join(AGGREGATIONS)}", default="token")
    scale_rewards: bool = option("divide advantages by the group's std (False: Dr. GRPO)", default=True)

    def check_values(self, prefix: str) -> None:
        super().check_values(prefix)
        check_range(f"{prefix}num_generations", self.num_generations, 2)  # a group of one has no advantage
        check_range(f"{prefix}temperature", self.temperature, 0, open_low=True)
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"config key '{prefix}top_p' must be > 0 and ≤ 1, got {self.top_p!r}")
        check_range(f"{prefix}iterations", self.iterations, 1)
        for key in ("clip_low", "clip_high", "beta"):
            check_range(f"{prefix}{key}", getattr(self, key), 0)
        check_choice(f"{prefix}aggregation", self.aggregation, AGGREGATIONS)


@dataclass
class GroupBatch:
    """One micro-batch of rollouts with everything the loss needs."""

    rollout: Rollout
    questions: list[Any]  # the prompts' questions (world `Question`s or `VQAItem`s)
    advantages: torch.Tensor  # (B·G,)
    logp_old: torch.Tensor | None  # (B·G, T); None on-policy (μ = 1): the loss uses logp.detach()
    logp_ref: torch.Tensor | None
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # logged with the loss
    extras: dict[str, Any] = field(default_factory=dict)  # what subclasses add (PAPO's masked prompts)


class GRPO(VLMMethod):
    config_class = GRPOConfig
    config: GRPOConfig

    def setup(self, accelerator) -> None:
        c = self.config
        schedule = RolloutSchedule.of_run(self.run.train, c.iterations, accelerator.num_processes,
                                          accelerator.process_index, self.run.method_section)  # fmt: skip
        super().setup(accelerator)
        self.rollouts = RolloutSource(schedule, self.source.item, self.rollout)

    def needs_reference_copy(self) -> bool:
        return self.config.beta > 0

    def answers(self, questions: list[Any]) -> list[str]:
        return [q.answer for q in questions for _ in range(self.config.num_generations)]

    def extra_rewards(self, batch: GroupBatch) -> dict[str, torch.Tensor]:
        """Further reward terms `{name: (B·G,)}`, already weighted (listener shaping adds one)."""
        return {}

    @torch.no_grad()
    def rollout(self, questions: list[Any]) -> GroupBatch:
        c, vlm = self.config, self.vlm
        rollout = vlm.sample(
            [q.conversation() for q in questions],
            c.num_generations,
            max_new_tokens=c.max_new_tokens,
            temperature=c.temperature,
            top_p=c.top_p,
        )
        args = (rollout.prompts, rollout.completion_ids, rollout.completion_mask)
        logp_old = vlm.token_logprobs(*args, temperature=c.temperature)[0] if c.iterations > 1 else None
        logp_ref = vlm.token_logprobs(*args, temperature=c.temperature, reference=True)[0] if c.beta else None
        batch = GroupBatch(rollout, questions, torch.zeros(0), logp_old, logp_ref)
        total, parts = weighted_rewards(c.rewards, rollout.texts, self.answers(questions))
        extra = self.extra_rewards(batch)
        total = total + sum(extra.values(), torch.zeros_like(total))
        batch.advantages = group_advantages(total, c.num_generations, c.scale_rewards).to(vlm.device)
        groups = total.reshape(-1, c.num_generations)
        batch.stats.update(
            {
                "reward": total.mean(),
                **{f"reward/{k}": v.mean() for k, v in {**parts, **extra}.items()},
                "frac_reward_zero_std": (groups == groups[:, :1]).all(1).float().mean(),
                "completion_length": rollout.completion_mask.sum(1).float().mean(),
            }
        )
        return batch

    def next_batch(self, step: int, micro: int) -> GroupBatch:
        return self.rollouts.batch(step, micro)

    def policy_loss(self, batch: GroupBatch) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor]:
        """GRPO's loss, its metrics, and the policy's log-probs `(B·G, T)` (with gradient) it was made from."""
        c, r = self.config, batch.rollout
        logp, entropy = self.vlm.token_logprobs(
            r.prompts,
            r.completion_ids,
            r.completion_mask,
            temperature=c.temperature,
            with_entropy=True,
            model=self.module,
        )
        mask = r.completion_mask
        logp_old = logp.detach() if batch.logp_old is None else batch.logp_old
        loss, metrics = grpo_loss(
            logp,
            logp_old,
            batch.advantages,
            mask,
            clip_low=c.clip_low,
            clip_high=c.clip_high,
            beta=c.beta,
            logp_ref=batch.logp_ref,
            aggregation=c.aggregation,
            max_length=c.max_new_tokens,
        )
        entropy_mean = (entropy.detach() * mask).sum() / mask.sum().clamp(min=1)
        return loss, {**batch.stats, **metrics, "entropy": entropy_mean}, logp

    def compute_loss(self, batch: GroupBatch, step: int, micro: int) -> tuple[torch.Tensor, dict[str, Any]]:
        loss, metrics, _ = self.policy_loss(batch)
        return loss, metrics
