"""Recipes of several stages on the one Trainer: `StagedRecipe` (GAN-RM rounds, RewardCS rounds).

A staged recipe runs in one run directory, with the resume story of any run:

- `config.yaml` holds the resolved config; a rerun with another config is refused naming the file
  (`train.resume=false` starts over: the run directory is emptied first);
- `stage(name, fn)` runs one step and records its JSON result in `stages.json` (atomically) when it
  completes; a rerun returns recorded results without running them again, so a killed run goes on
  at the stage it was in;
- `train_stage(run)` is an ordinary Trainer run in a sub-folder, which resumes from its own
  checkpoints, so the recipe ends with the weights an uninterrupted run ends with;
- `write_report` writes `report.json` and `report.md` with the table of stages.

A new staged recipe sets `config_class` and the section classes as a `Method` does
(`model_config_class`, `data_config_class`, `eval_config_class`) and implements `run_stages()`,
built from `stage` and `train_stage`, returning `write_report(...)`'s result.
"""

from __future__ import annotations

import json
import shutil
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mmalign.config import RunConfig, dump_config
from mmalign.io import atomic_write_json, atomic_write_text
from mmalign.train.checkpoint import remove_partial
from mmalign.train.method import RunSections
from mmalign.train.rundir import check_config

STAGES_FILE = "stages.json"


class StagedRecipe(RunSections, ABC):
    """Base of the recipes made of stages; see the module doc for what a subclass implements."""

    def __init__(self, run: RunConfig):
        super().__init__(run)
        self.out = Path(run.output_dir)
        self._stages: dict[str, Any] = {}

    # ------------------------------------------------------------------ the run directory
    def prepare(self) -> None:
        """Check or start the run directory (see the module doc); load the completed stages."""
        resumed = check_config(self.out, self.run)
        if not resumed and self.out.exists():
            for path in self.out.iterdir():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        self.out.mkdir(parents=True, exist_ok=True)
        for folder in [self.out, *(p for p in self.out.iterdir() if p.is_dir())]:
            remove_partial(folder)  # what a kill left half-written by a stage
        atomic_write_text(self.out / "config.yaml", dump_config(self.run))
        record = self.out / STAGES_FILE
        self._stages = json.loads(record.read_text()) if record.is_file() else {}

    def stage(self, name: str, fn: Callable[[], Any]) -> Any:
        """`fn()`'s result, run once: recorded in `stages.json` when it returns, read back on a rerun."""
        if name not in self._stages:
            self._stages[name] = fn()
            atomic_write_json(self.out / STAGES_FILE, self._stages)
        return self._stages[name]

    def result(self, name: str) -> Any:
        """The recorded result of a completed stage."""
        return self._stages[name]

    def train_stage(self, run: RunConfig) -> dict[str, Any]:
        """Stage `run.output_dir` (relative to this run's): a Trainer run of `run`; its report."""
        import mmalign.train as training

        name = str(Path(run.output_dir).relative_to(self.out))
        return self.stage(name, lambda: training.run(run))

    def train(self) -> dict[str, Any]:
        """Prepare the run directory and run the stages (what `mmalign.train` calls)."""
        self.prepare()
        return self.run_stages()

    @abstractmethod
    def run_stages(self) -> dict[str, Any]:
        """Run every stage through `stage` / `train_stage` and return `write_report`'s result."""

    # ------------------------------------------------------------------ the report
    def write_report(
        self,
        *,
        title: str,
        gold: str,
        before: dict[str, Any],
        after: dict[str, Any],
        steps: int,
        rows: list[dict[str, Any]],
        columns: dict[str, str],
        description: str,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """`report.json` and `report.md`: the gold metric `before` → `after` (metric dicts), the table of
        `rows` (one per round; `columns` maps a row key to its column heading) and `description`."""
        report = {
            "recipe": self.run.recipe or self.run.method,
            "method": self.run.method,
            "steps": steps,
            "gold_metric": gold,
            "before": before.get(gold),
            "after": after.get(gold),
            "delta": after.get(gold, 0.0) - before.get(gold, 0.0),
            "metrics": {"before": before, "after": after},
            "rounds": rows,
            **(extra or {}),
        }
        atomic_write_json(self.out / "report.json", report)

        def cell(value: Any) -> str:
            return f"{value:.4f}" if isinstance(value, float) else str(value)

        table = [
            "| " + " | ".join(columns.values()) + " |",
            "|" + "---|" * len(columns),
            *["| " + " | ".join(cell(row[key]) for key in columns) + " |" for row in rows],
        ]
        lines = [
            f"# {report['recipe']}: {title}",
            "",
            f"Gold metric `{gold}`: **{cell(report['before'])} → {cell(report['after'])}** ({report['delta']:+.4f}).",
            "",
            *table,
            "",
            description,
        ]
        atomic_write_text(self.out / "report.md", "\n".join(lines) + "\n")
        return report
