"""Where training pairs come from: a user's path as given, or the embedded set built and cached."""

from __future__ import annotations

import os
from pathlib import Path

from mmalign.config import CachedDataSource, DataConfig
from mmalign.data.shapes_prefs import build_shapes_prefs, fingerprint
from mmalign.io import cache_lock
from mmalign.registry import EMBEDDED_PREFIX, unknown_name_error

EMBEDDED_PAIRS = ("shapes-prefs",)


def cache_root(config: CachedDataSource) -> Path:
    """`data.cache_dir`, else `$MMALIGN_CACHE`, else `~/.cache/mmalign`."""
    if config.cache_dir:
        return Path(config.cache_dir)
    return Path(os.environ.get("MMALIGN_CACHE", Path.home() / ".cache" / "mmalign"))


def embedded_pairs_directory(config: DataConfig, model_path: str) -> Path:
    """Where the pairs of `config.path = embedded:<name>` generated from `model_path` are cached."""
    name = config.path[len(EMBEDDED_PREFIX) :]
    if name not in EMBEDDED_PAIRS:
        raise unknown_name_error("embedded dataset", name, list(EMBEDDED_PAIRS))
    return cache_root(config) / name / fingerprint(config.embedded, model_path)


def resolve_pairs_path(config: DataConfig, model, model_path: str) -> str:
    """The pair source to open; `embedded:shapes-prefs` is generated with `model` (loaded from
    `model_path`) once and cached under a key of the generation options and the model files."""
    if not config.path.startswith(EMBEDDED_PREFIX):
        return config.path
    directory = embedded_pairs_directory(config, model_path)
    with cache_lock(directory):
        if not (directory / "pairs.jsonl").is_file():
            build_shapes_prefs(config.embedded, model, directory)
    return str(directory)
