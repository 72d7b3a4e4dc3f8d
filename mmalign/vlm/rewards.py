"""Verifiable rewards on VLM responses of the form `<think>…</think><answer>…</answer>`.

A reward function takes the decoded completions and the rows' reference answers and returns one
float per completion: `f(completions: list[str], answers: list[str]) -> list[float]`.
`weighted_rewards` combines a list of them (`RewardTerm`s), as TRL's `reward_weights` does.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mmalign.config import option

#: one think block, then one answer block, nothing else around them
RESPONSE = re.compile(r"^\s*<think>(?P<think>.+?)</think>\s*<answer>(?P<answer>.+?)</answer>\s*$", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def parse_response(text: str) -> tuple[str, str] | None:
    """`(thinking, answer)` of a well-formed response, None otherwise (tags missing, repeated or nested)."""
    match = RESPONSE.match(text)
    if match is None:
        return None
    thinking, answer = match["think"], match["answer"]
    if any(tag in thinking or tag in answer for tag in _TAGS):
        return None
    return thinking.strip(), answer.strip()


def extract_answer(text: str) -> str | None:
    """The content of the last `<answer>…</answer>` block, stripped, even if the format is otherwise wrong."""
    found = _ANSWER.findall(text)
    return found[-1].strip() if found else None


def normalise(answer: str) -> str:
    return " ".join(answer.lower().strip().rstrip(".").split())


def format_reward(completions: Sequence[str], answers: Sequence[str]) -> list[float]:
    """1 for a well-formed `<think>…</think><answer>…</answer>` response, else 0."""
    return [float(parse_response(c) is not None) for c in completions]


def accuracy_reward(completions: Sequence[str], answers: Sequence[str]) -> list[float]:
    """1 when the answer block matches the reference answer (case and spacing ignored), else 0."""
    out = []
    for completion, answer in zip(completions, answers):
        given = extract_answer(completion)
        out.append(float(given is not None and normalise(given) == normalise(answer)))
    return out


REWARD_FUNCTIONS: dict[str, Callable[[Sequence[str], Sequence[str]], list[float]]] = {
    "accuracy": accuracy_reward,
    "format": format_reward,
}


@dataclass
class RewardTerm:
    """One weighted reward function of the total `r = Σ weight · f`."""

    name: str = option(f"reward function: one of {sorted(REWARD_FUNCTIONS)}", default="accuracy")
    weight: float = option("its weight in the total reward", default=1.0)


def weighted_rewards(
    terms: Sequence[RewardTerm], completions: Sequence[str], answers: Sequence[str]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total reward `(B,)` and each function's raw values `{name: (B,)}`."""
    parts = {}
    for term in terms:
        if term.name not in REWARD_FUNCTIONS:
            raise ValueError(f"unknown reward function {term.name!r}; choose from {sorted(REWARD_FUNCTIONS)}")
        parts[term.name] = torch.tensor(REWARD_FUNCTIONS[term.name](completions, answers), dtype=torch.float32)
    total = sum(term.weight * parts[term.name] for term in terms)
    return torch.as_tensor(total, dtype=torch.float32).expand(len(completions)).clone(), parts
