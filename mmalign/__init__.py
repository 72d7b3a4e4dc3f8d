"""mmalign: align image, video, 3D and vision-language generative models with preferences and rewards.

Public face:
- `mmalign.train(config, *overrides)` runs a recipe (see `configs/`) and returns its report;
- `mmalign.load_reward(name_or_path, **kw)` returns a callable `reward(samples, prompts) -> (N,)`;
- `mmalign.score(samples, prompts, reward="clip-score")` scores in one call.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load_reward", "score", "train"]


def load_reward(name_or_path: str | dict[str, Any], **kwargs: Any):
    """A reward by name, folder, `video:`/`mesh-views:` prefix, `http://` URL or `{reward: weight}` sum
    (see `mmalign.rewards.load_reward`)."""
    from mmalign.rewards import load_reward as _load

    return _load(name_or_path, **kwargs)


def score(samples: Any, prompts: Any = None, reward: str | dict[str, Any] = "clip-score", **kwargs: Any):
    """Score samples with a reward (anything `load_reward` takes); returns a `(N,)` tensor.

    Samples may be images, videos (an image reward scores 8 evenly spaced frames, mean-pooled) or
    meshes (an image reward scores 4 rendered views, mean-pooled); `kwargs` go to `load_reward`.
    """
    return load_reward(reward, **kwargs)(samples, prompts)


def __getattr__(name: str) -> Any:
    if name == "train":  # imported on first use: the training stack pulls in accelerate and diffusers
        import importlib

        return importlib.import_module("mmalign.train")
    raise AttributeError(f"module 'mmalign' has no attribute {name!r}")
