"""Prompt lists: a split of an embedded world, a text file (one prompt per line) or a JSONL file."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

from mmalign.config import ConfigError
from mmalign.data.pairs import jsonl_rows

WORLD_SPLITS = ("train", "heldout")


def read_prompts(spec: str, world: ModuleType, key: str) -> list[str]:
    """The prompts `spec` names: `train` / `heldout` (the captions of that split of `world`), a `.jsonl`
    file of rows with a `prompt` field, or a text file with one prompt per line. Errors name `key`,
    the file and the row."""
    if spec in WORLD_SPLITS:
        return world.captions(spec)
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"{key}: no such file {path} (or use {' / '.join(WORLD_SPLITS)})")
    if path.suffix == ".jsonl":
        prompts = []
        for row, record in jsonl_rows(path, ("prompt",)):
            prompt = record["prompt"]
            if not isinstance(prompt, str) or not prompt.strip():
                raise ConfigError(f"{path}, row {row}: field 'prompt' must be a non-empty string")
            prompts.append(prompt.strip())
    else:
        prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"{key}: {path} holds no prompts")
    return prompts
