"""Weighted sums of rewards: `load_reward({"clip-score": 0.5, "shapes-gold": 0.5})`.

A spec maps each reward (any name `load_reward` takes: a registered name, a folder, `video:…`,
`mesh-views:…`, `http://host:port/name`) to its weight, or to a mapping with these keys:

- `weight` (default 1.0);
- `normalise`: `none` (default: the raw score), `batch` or `fixed`;
- `mean`, `std`: the fixed statistics (giving them implies `normalise: fixed`);
- `args`: keyword arguments for that reward (over those given to `load_reward` for the whole sum).

The sum of samples `x_1 … x_N` scored in one call is `Σ_k weight_k · z_k(x_i)` with

- `none`:  `z(x_i) = s(x_i)`, the reward's own scale (clip-score ≈ 100 · cos, shapes-gold in [0, 1]);
- `batch`: `z(x_i) = (s(x_i) − mean_j s(x_j)) / (std_j s(x_j) + 1e-8)`, a z-score over the samples of
  that call (population std), so it depends on what else is in the call: it ranks samples within
  the call (as group-relative RL advantages do); one sample, or equal scores, give 0;
- `fixed`: `z(x_i) = (s(x_i) − mean) / std`, with the given constants (e.g. the reward's mean and std
  measured on a reference set), the same whatever the batch.

Image rewards sum with video or mesh rewards (they score frames or views, `mmalign.rewards.media`);
video and mesh rewards do not sum. A NaN from any term makes that sample's sum NaN.

The spec may also be given as a string holding a YAML / JSON mapping
(`'{clip-score: 0.5, shapes-gold: 0.5}'`), which is how string-valued config keys (`eval.rewards`,
`data.reward`, …) and `mmalign score --reward` take a weighted sum.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mmalign.rewards.base import Reward, RewardInputError

NORMALISATIONS = ("none", "batch", "fixed")
TERM_KEYS = ("weight", "normalise", "normalize", "mean", "std", "args")


@dataclass
class Term:
    """One reward of a sum: its spec name, the loaded reward, weight and normalisation."""

    name: str
    reward: Reward
    weight: float = 1.0
    normalise: str = "none"
    mean: float = 0.0
    std: float = 1.0
    args: dict[str, Any] = field(default_factory=dict)

    def normalised(self, scores: torch.Tensor) -> torch.Tensor:
        """`scores (N,)` → `z (N,)` by this term's normalisation (module doc)."""
        if self.normalise == "batch":
            finite = scores[torch.isfinite(scores)]
            if len(finite) == 0:
                return scores
            return (scores - finite.mean()) / (finite.std(unbiased=False) + 1e-8)
        if self.normalise == "fixed":
            return (scores - self.mean) / self.std
        return scores


def parse_term(name: str, value: Any) -> dict[str, Any]:
    """One spec entry → `Term` keyword arguments (without the reward), with a one-line error naming the key."""
    if isinstance(value, bool) or not isinstance(value, (int, float, dict)):
        raise RewardInputError(f"weighted reward {name!r}: expected a weight or a mapping, got {value!r}")
    if not isinstance(value, dict):
        value = {"weight": value}
    unknown = sorted(set(value) - set(TERM_KEYS))
    if unknown:
        raise RewardInputError(f"weighted reward {name!r}: unknown key {unknown[0]!r}; expected {', '.join(TERM_KEYS)}")
    out: dict[str, Any] = {"name": name}
    for key in ("weight", "mean", "std"):
        if key in value:
            number = value[key]
            if isinstance(number, bool) or not isinstance(number, (int, float)) or not math.isfinite(number):
                raise RewardInputError(f"weighted reward {name!r}: {key} must be a finite number, got {number!r}")
            out[key] = float(number)
    fixed = "mean" in value or "std" in value
    normalise = value.get("normalise", value.get("normalize", "fixed" if fixed else "none"))
    if normalise not in NORMALISATIONS:
        raise RewardInputError(
            f"weighted reward {name!r}: normalise={normalise!r}; expected one of {', '.join(NORMALISATIONS)}"
        )
    if normalise == "fixed" and not ("mean" in value and "std" in value and value["std"] > 0):
        raise RewardInputError(f"weighted reward {name!r}: normalise: fixed needs mean and a positive std")
    if fixed and normalise != "fixed":
        raise RewardInputError(f"weighted reward {name!r}: mean/std are only read with normalise: fixed")
    args = value.get("args", {})
    if not isinstance(args, dict):
        raise RewardInputError(f"weighted reward {name!r}: args must be a mapping, got {args!r}")
    out.update(normalise=normalise, args=dict(args))
    return out


class WeightedSum(Reward):
    """`Σ_k weight_k · z_k`: a weighted sum of rewards, each raw or normalised (module doc).

    Built by `load_reward(spec, **kwargs)`: `kwargs` go to every term's reward (e.g. `device=`), a
    term's `args` over them. `terms` holds the loaded rewards; `term_scores` gives each one's raw scores.
    """

    name = "weighted-sum"

    def __init__(self, terms: list[Term]):
        if not terms:
            raise RewardInputError("a weighted reward needs at least one reward")
        self.terms = terms
        self.needs_prompts = any(t.reward.needs_prompts for t in terms)
        # image rewards also score videos and meshes (`mmalign.rewards.media`), so they go with either
        kinds = {getattr(t.reward, "file_kind", "image") for t in terms} - {"image"}
        if len(kinds) > 1:
            raise RewardInputError(f"a weighted reward cannot sum rewards of {' and '.join(sorted(kinds))}")
        for term in terms:
            if getattr(term.reward, "file_kind", "image") != "image":
                self.file_kind, self.file_suffixes = term.reward.file_kind, term.reward.file_suffixes
                break
        self.name = " + ".join(f"{t.weight:g}·{t.name}" for t in terms)

    def term_scores(
        self, samples: Any, prompts: str | Sequence[str] | None = None, progress: bool | None = None
    ) -> dict[str, torch.Tensor]:
        """Each term's raw scores `(N,)`, by its spec name."""
        return {t.name: t.reward(samples, prompts if t.reward.needs_prompts else None, progress) for t in self.terms}

    def __call__(
        self, samples: Any, prompts: str | Sequence[str] | None = None, progress: bool | None = None
    ) -> torch.Tensor:
        """The weighted sum `(N,)` of every term's (normalised) scores of `samples`."""
        raw = self.term_scores(samples, prompts, progress)
        return sum(t.weight * t.normalised(raw[t.name]) for t in self.terms)

    def score_batch(self, images: torch.Tensor, prompts: list[str] | None) -> torch.Tensor:
        """`images (N, 3, H, W)` in [0, 1] → `(N,)`; the same as calling the sum on them."""
        return self(images, prompts)


def build_weighted_sum(spec: dict[str, Any], kwargs: dict[str, Any]) -> WeightedSum:
    """`WeightedSum` of `spec` (module doc), loading each term by `load_reward(name, **kwargs, **args)`."""
    from mmalign.rewards import load_reward

    terms = []
    for name, value in spec.items():
        if not isinstance(name, str):
            raise RewardInputError(f"weighted reward: key {name!r} is not a reward name")
        fields = parse_term(name, value)
        terms.append(Term(reward=load_reward(name, **{**kwargs, **fields["args"]}), **fields))
    return WeightedSum(terms)
