"""Rewards: `load_reward(name_or_path, **kw)` returns a callable `reward(samples, prompts=None) -> (N,)`."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

from mmalign.registry import REWARDS, import_string, load, resolve_model_path, unknown_name_error
from mmalign.rewards.base import Reward, RewardInputError

__all__ = ["Reward", "RewardInputError", "load_reward", "available_rewards"]

#: file a trained reward writes into its folder: {"reward": "<registered name>", ...}
REWARD_MANIFEST = "mmalign_reward.json"


def available_rewards() -> dict[str, str]:
    """Registered reward names and their one-line descriptions."""
    return {name: description for name, (_, description) in REWARDS.items()}


def load_reward(name_or_path: str, **kwargs) -> Reward:
    """A registered reward by name (`clip-score`, `shapes-gold`, …) or a trained reward's folder.

    A folder (or a shipped one, `embedded:<name>`) is recognised by its `mmalign_reward.json`
    manifest, which names the reward class; keyword arguments go to the reward's constructor
    (e.g. `path=`, `device=`), and one it does not take is an error naming it.
    """
    if name_or_path in REWARDS:
        return _construct(name_or_path, load(REWARDS, "reward", name_or_path), kwargs)
    folder = resolve_model_path(name_or_path)
    manifest = Path(folder) / REWARD_MANIFEST
    if manifest.is_file():
        name = json.loads(manifest.read_text())["reward"]
        if name not in REWARDS:
            raise unknown_name_error("reward", name, list(REWARDS))
        return _construct(name, import_string(REWARDS[name][0]), {"path": folder, **kwargs})
    raise unknown_name_error("reward", name_or_path, list(REWARDS))


def _construct(name: str, reward_class: type[Reward], kwargs: dict) -> Reward:
    """`reward_class(**kwargs)`, refusing keyword arguments its constructor does not take."""
    parameters = inspect.signature(reward_class).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        unknown = sorted(set(kwargs) - set(parameters))
        if unknown:
            takes = ", ".join(parameters) or "no arguments"
            raise RewardInputError(f"reward {name!r} takes no argument {unknown[0]!r}; it takes: {takes}")
    return reward_class(**kwargs)
