"""Listener-shaped GRPO (`method: listener-grpo`): a frozen VLM re-reads the reasoning and its belief shapes the reward.

The reasoner answers `<think>z</think><answer>a</answer>` to a question with a closed set of
answers, the `decisions` ("which of two images shows the prompt better?": "1" or "2"; a
multiple-choice set: "A"…"D"). A frozen listener (any model `VisionLanguageModel` loads; the shipped
tiny VLM by default) gets the same images and question, then `<think>z</think><answer>` as a forced
prefix of its own reply, and its next-token logits for the decision tokens give
`p_L(y) = softmax(s_decisions)_y` (renormalised over the legal tokens only). Rows whose reference
answer is not a decision get `r_list = 0`. The listener never
sees the reasoner's answer: `listener_view` returns the thinking of a well-formed response only
(no tag of either kind inside it, nothing after `</think>`), and an ill-formed response gets
`r_list = 0`. The reward is `Σ rewards (format 1 + accuracy 0.5 by default) + listener_weight · r_list`
with `r_list = p_L(y*)`. Logged: the listener reward and the contradiction rate (the listener's
argmax differs from the reasoner's parsed answer), in training and on the held-out questions whose
answer is a decision.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mmalign.config import option
from mmalign.models.vlm import Conversation, VisionLanguageModel
from mmalign.registry import resolve_model_path
from mmalign.vlm.evaluation import AnswerStats
from mmalign.vlm.grpo import GRPO, GroupBatch, GRPOConfig
from mmalign.vlm.rewards import RewardTerm, extract_answer, parse_response

DECISIONS = ("1", "2")


def listener_view(response: str) -> str | None:
    """The reasoning a listener may read: the thinking of a well-formed response, None otherwise.

    `parse_response` accepts exactly one `<think>` block followed by one `<answer>` block and rejects
    any tag inside either, so the result holds no answer tag and nothing that followed `</think>`.
    """
    parsed = parse_response(response)
    return None if parsed is None else parsed[0]


class Listener:
    """A frozen VLM that reads a reasoning and reports its probability of each decision."""

    def __init__(self, vlm: VisionLanguageModel, decisions: tuple[str, ...] = DECISIONS):
        self.vlm = vlm
        vlm.model.requires_grad_(False)
        vlm.model.eval()
        self.decision_ids = []
        for decision in decisions:
            ids = vlm.tokenizer.encode(decision, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"decision {decision!r} is {len(ids)} tokens for the listener's tokenizer; need 1")
            self.decision_ids.append(ids[0])

    @torch.no_grad()
    def probabilities(self, conversations: list[Conversation], reasonings: list[str]) -> torch.Tensor:
        """`(B, len(decisions))`: each row sums to 1, from the logits right after `<think>z</think><answer>`."""
        prompts = self.vlm.encode(conversations)
        ids, mask = self.vlm.completion_tokens([f"<think>{z}</think><answer>" for z in reasonings], end_of_turn=False)
        logits = self.vlm.forward(prompts, ids, mask).logits
        position = prompts.input_ids.shape[1] + mask.sum(1) - 1  # the last prefix token predicts the decision
        rows = torch.arange(len(reasonings), device=logits.device)
        return torch.softmax(logits[rows, position][:, self.decision_ids].float(), dim=-1)


@dataclass
class ListenerGRPOConfig(GRPOConfig):
    """Options of `listener-grpo` (section `listener_grpo`): GRPO's plus the listener."""

    listener: str = option("the frozen listener: hub name, folder or embedded:<name>", default="embedded:vlm-shapes")
    listener_weight: float = option("weight of r_list = p_L(correct image) in the reward", default=0.5)
    decisions: list[str] = option(
        "the answers the listener chooses between (one token each)", default_factory=lambda: list(DECISIONS)
    )
    rewards: list[RewardTerm] = option(
        "weighted reward functions besides the listener (the paper: r_fmt + 0.5·r_acc)",
        default_factory=lambda: [RewardTerm("format", 1.0), RewardTerm("accuracy", 0.5)],
    )


class ListenerGRPO(GRPO):
    config_class = ListenerGRPOConfig
    config: ListenerGRPOConfig

    def setup(self, accelerator) -> None:
        super().setup(accelerator)
        listener_vlm = VisionLanguageModel.from_pretrained(
            resolve_model_path(self.config.listener),
            device=accelerator.device,
            allow_pickle=self.run.model.allow_pickle,
        )
        self.listener = Listener(listener_vlm, tuple(self.config.decisions))

    def listener_rewards(self, conversations: list[Conversation], responses: list[str], answers: list[str]):
        """`r_list (B,)` and the contradiction flags `(B,)` (NaN where the reasoner gave no usable answer)."""
        decisions = self.config.decisions
        views = [listener_view(r) for r in responses]
        valid = [i for i, v in enumerate(views) if v is not None]
        reward = torch.zeros(len(responses))
        contradiction = torch.full((len(responses),), float("nan"))
        if valid:
            probs = self.listener.probabilities([conversations[i] for i in valid], [views[i] for i in valid]).cpu()
            for row, i in enumerate(valid):
                if answers[i] in decisions:
                    reward[i] = probs[row, decisions.index(answers[i])]
                given = extract_answer(responses[i])
                if given in decisions:
                    contradiction[i] = float(decisions[int(probs[row].argmax())] != given)
        return reward, contradiction

    def extra_rewards(self, batch: GroupBatch) -> dict[str, torch.Tensor]:
        rollout = batch.rollout
        reward, contradiction = self.listener_rewards(
            rollout.prompts.conversations, rollout.texts, self.answers(batch.questions)
        )
        judged = ~contradiction.isnan()
        batch.stats["listener_judged_frac"] = judged.float().mean()  # responses with a usable answer
        batch.stats["listener_contradiction"] = contradiction[judged].mean() if judged.any() else torch.zeros(())
        batch.stats["listener_probability"] = reward.mean()
        return {"listener": self.config.listener_weight * reward}

    def response_metrics(self, real: AnswerStats) -> dict[str, Any]:
        chosen = [i for i, q in enumerate(self.heldout) if q.answer in self.config.decisions]
        if not chosen:
            return {}
        conversations = [self.heldout[i].conversation() for i in chosen]
        reward, contradiction = self.listener_rewards(
            conversations, [real.responses[i] for i in chosen], [self.heldout[i].answer for i in chosen]
        )
        judged = ~contradiction.isnan()
        rate = contradiction[judged].mean().item() if judged.any() else float("nan")  # NaN: dropped from the metrics
        return {"listener_probability": reward.mean().item(), "listener_contradiction": rate}
