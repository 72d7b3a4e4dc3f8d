"""The one rule for reusing a run directory: same config, resume; other config, refuse (or start over)."""

from __future__ import annotations

from pathlib import Path

from mmalign.config import RunConfig, dump_config
from mmalign.errors import UserInputError


class ConfigMismatchError(UserInputError):
    """The output directory holds a run with a different configuration."""


def _holds_outputs(run_dir: Path) -> bool:
    """Whether a run directory holds more than its config and logs: a run that failed before writing anything
    else (a bad option, an unreadable file) may start over with a corrected config."""
    return any(path.name not in ("config.yaml", "logs") for path in run_dir.iterdir())


def check_config(run_dir: Path, run: RunConfig) -> bool:
    """Whether the run in `run_dir` is resumed: its `config.yaml` exists and matches `run` (with
    `train.resume` on). A different config in a directory that holds outputs is refused."""
    config_file = run_dir / "config.yaml"
    if not (run.train.resume and config_file.exists()):
        return False
    if config_file.read_text() != dump_config(run) and _holds_outputs(run_dir):
        raise ConfigMismatchError(
            f"{run_dir} holds a run with a different config ({config_file}); use another output_dir "
            "or set train.resume=false to start over"
        )
    return True
