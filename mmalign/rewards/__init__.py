"""Rewards: `load_reward(name_or_path, **kw)` returns a callable `reward(samples, prompts=None) -> (N,)`."""

from __future__ import annotations

import inspect
import json
from pathlib import Path
from typing import Any

from mmalign.registry import REWARDS, import_string, load, resolve_model_path, unknown_name_error
from mmalign.rewards.base import Reward, RewardInputError

__all__ = ["Reward", "RewardInputError", "load_reward", "available_rewards"]

#: file a trained reward writes into its folder: {"reward": "<registered name>", ...}
REWARD_MANIFEST = "mmalign_reward.json"


def available_rewards() -> dict[str, str]:
    """Registered reward names and their one-line descriptions."""
    return {name: description for name, (_, description) in REWARDS.items()}


def load_reward(name_or_path: str | dict[str, Any], **kwargs: Any) -> Reward:
    """A reward by name, folder, URL, wrapper prefix or weighted-sum spec.

    - a registered name (`clip-score`, `shapes-gold`, …);
    - a trained reward's folder (or a shipped one, `embedded:<name>`), recognised by its
      `mmalign_reward.json` manifest, which names the reward class;
    - `video:<reward>` / `mesh-views:<reward>`: an image reward on sampled frames / rendered views
      (`mmalign.rewards.media`; `frames`, `views`, `size`, `elevation`, `pool` go to the wrapper);
    - `http://host:port/<name>`: a reward served by `mmalign serve-reward` (`mmalign.rewards.http`);
    - a mapping `{reward: weight, …}` or a string holding one (`'{clip-score: 0.5, shapes-gold: 0.5}'`):
      a weighted sum (`mmalign.rewards.combine`), `kwargs` going to every term.

    Keyword arguments go to the reward's constructor (e.g. `path=`, `device=`), and one it does
    not take is an error naming it.
    """
    if isinstance(name_or_path, str) and name_or_path.lstrip().startswith("{"):
        name_or_path = _parse_spec(name_or_path)
    if isinstance(name_or_path, dict):
        from mmalign.rewards.combine import build_weighted_sum

        return build_weighted_sum(name_or_path, kwargs)
    if not isinstance(name_or_path, str):
        raise RewardInputError(f"a reward is a name, folder, URL or {{name: weight}} mapping, got {name_or_path!r}")
    if name_or_path.startswith(("http://", "https://")):
        from mmalign.rewards.http import HttpReward

        return _construct(name_or_path, HttpReward, {"url": name_or_path, **kwargs})
    for prefix in ("video:", "mesh-views:"):
        if name_or_path.startswith(prefix):
            from mmalign.rewards.media import WRAPPERS, wrapper_class

            own = WRAPPERS[prefix][1]
            inner = load_reward(name_or_path[len(prefix) :], **{k: v for k, v in kwargs.items() if k not in own})
            return wrapper_class(prefix)(inner, **{k: v for k, v in kwargs.items() if k in own})
    if name_or_path in REWARDS:
        return _construct(name_or_path, load(REWARDS, "reward", name_or_path), kwargs)
    folder = resolve_model_path(name_or_path)
    manifest = Path(folder) / REWARD_MANIFEST
    if manifest.is_file():
        try:
            name = json.loads(manifest.read_text())["reward"]
        except (ValueError, KeyError, TypeError) as exc:  # not JSON, or not an object with a "reward" name
            raise RewardInputError(f'{manifest}: not a reward manifest with a "reward" name ({exc!r})') from None
        if name not in REWARDS:
            raise unknown_name_error("reward", name, list(REWARDS))
        return _construct(name, import_string(REWARDS[name][0]), {"path": folder, **kwargs})
    raise unknown_name_error("reward", name_or_path, list(REWARDS))


def _parse_spec(text: str) -> dict[str, Any]:
    """A weighted-sum spec written as a YAML / JSON mapping string → the mapping."""
    import yaml

    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise RewardInputError(f"weighted reward {text!r}: not a YAML mapping ({error})".splitlines()[0]) from None
    if not isinstance(spec, dict):
        raise RewardInputError(f"weighted reward {text!r}: expected a {{reward: weight}} mapping")
    return spec


def _construct(name: str, reward_class: type[Reward], kwargs: dict) -> Reward:
    """`reward_class(**kwargs)`, refusing keyword arguments its constructor does not take."""
    parameters = inspect.signature(reward_class).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        unknown = sorted(set(kwargs) - set(parameters))
        if unknown:
            takes = ", ".join(parameters) or "no arguments"
            raise RewardInputError(f"reward {name!r} takes no argument {unknown[0]!r}; it takes: {takes}")
    return reward_class(**kwargs)
