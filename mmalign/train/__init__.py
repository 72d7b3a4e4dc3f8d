"""The shared training loop. `mmalign.train(config, *overrides)` runs a recipe and returns its report.

The package object itself is callable (its module class defines `__call__`), so the public
`mmalign.train(...)` and the subpackage `mmalign.train.trainer` share one name without shadowing.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any


def run(config: Any, *overrides: str) -> dict[str, Any]:
    """Train a recipe: `config` is a YAML path or a `RunConfig`; overrides look like `train.max_steps=10`."""
    from mmalign.config import RunConfig, load_config
    from mmalign.registry import METHODS, load
    from mmalign.train.stages import StagedRecipe
    from mmalign.train.trainer import Trainer

    run_config = config if isinstance(config, RunConfig) else load_config(Path(config), overrides)
    method = load(METHODS, "method", run_config.method)(run_config)
    if isinstance(method, StagedRecipe):  # rounds: stages of Trainer runs in one run directory
        return method.train()
    return Trainer(run_config, method).train()


class _CallablePackage(types.ModuleType):
    def __call__(self, config: Any, *overrides: str) -> dict[str, Any]:
        return run(config, *overrides)


sys.modules[__name__].__class__ = _CallablePackage
