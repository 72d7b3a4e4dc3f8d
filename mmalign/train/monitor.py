"""The reward-hacking monitor every Trainer run has (`eval.monitor`, `mmalign.config.MonitorConfig`).

Reward hacking: the reward a method trains against keeps rising while the real quality falls. The
monitor compares two metrics of each evaluation: `eval.monitor.reward`, the training reward measured
on held-out prompts, and `eval.monitor.metric`, a held-out metric the method never trains on (the
method's gold metric by default; higher is better).

The rule (`firings`): an evaluation is *hacked* when, against its baseline, the reward is higher by more
than `min_delta` and the metric lower by more than `min_delta`; the monitor fires at every evaluation
that ends a run of at least `patience` hacked evaluations in a row. The baseline (`baseline`) is either
the evaluation with the best metric so far (`best`: a slow slide below the peak counts even when the
metric wobbles up between falls) or the evaluation just before (`previous`: only uninterrupted falls
count).

Everything here is a pure function of the evaluation history the Trainer keeps and checkpoints
(`TrainerState.evaluations`: `{"step", "train_seconds", "metrics"}` entries), so a resumed run
makes the same decisions as an uninterrupted one. An entry with `"restored_from"` is the evaluation
of weights restored after a stop, not a step of training; the rule and the best pass over it.

What the Trainer does with it (`action` other than `off`): it keeps the weights of the evaluation with
the best metric in `<run>/best/` (`trainable.safetensors` and `best.json`); on `warn` it prints each
firing, logs `monitor/hacking` and records it in the state (the report lists it); on `stop` it ends
training at the first firing, loads the best weights back and saves them as the final result.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from mmalign.config import ConfigError, MonitorConfig
from mmalign.io import atomic_directory, atomic_write_json

#: the folder of the run directory holding the best-by-monitor weights, and its two files
BEST_DIR, BEST_WEIGHTS, BEST_JSON = "best", "trainable.safetensors", "best.json"
#: the TensorBoard scalar: 1 at an evaluation where the monitor fires, 0 at the others
HACKING_TAG = "monitor/hacking"


def is_on(config: MonitorConfig | None) -> bool:
    return config is not None and config.action != "off"


def metric_name(config: MonitorConfig, gold: str) -> str:
    """The metric the monitor watches: `eval.monitor.metric`, or the method's gold metric `gold`."""
    return config.metric or gold


def monitored(evaluations: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The evaluations of training steps (without those of weights restored after a stop)."""
    return [e for e in evaluations if "restored_from" not in e]


def values(evaluation: dict[str, Any], reward: str, metric: str) -> tuple[float, float]:
    """`(reward, metric)` of one evaluation; a `ConfigError` naming the option whose metric is missing."""
    metrics = evaluation["metrics"]
    for key, name in (("eval.monitor.reward", reward), ("eval.monitor.metric", metric)):
        if name not in metrics:
            raise ConfigError(
                f"{key}={name!r} is not a metric of the evaluation at step {evaluation['step']}, which has: "
                f"{', '.join(metrics) or 'none'}; set {key} to one of them"
            )
    return float(metrics[reward]), float(metrics[metric])


def baselines(evaluations: list[dict[str, Any]], metric: str, baseline: str) -> list[int | None]:
    """For each evaluation, the index of the evaluation it is compared with (None for the first): the one
    before it (`previous`), or the earliest with the highest `metric` among those before it (`best`)."""
    out: list[int | None] = []
    top: int | None = None
    for i, evaluation in enumerate(evaluations):
        out.append(top if baseline == "best" else (i - 1 if i else None))
        if top is None or float(evaluation["metrics"][metric]) > float(evaluations[top]["metrics"][metric]):
            top = i
    return out


def streaks(
    evaluations: list[dict[str, Any]], reward: str, metric: str, min_delta: float, baseline: str = "best"
) -> list[int]:
    """For each evaluation, how many hacked evaluations in a row end at it (0: this one is not hacked)."""
    pairs = [values(e, reward, metric) for e in evaluations]
    out: list[int] = []
    for current, base in zip(pairs, baselines(evaluations, metric, baseline)):
        hacked = (
            base is not None and current[0] - pairs[base][0] > min_delta and pairs[base][1] - current[1] > min_delta
        )
        out.append(out[-1] + 1 if hacked else 0)
    return out


@dataclass(frozen=True)
class Firing:
    """The monitor fired at evaluation `step`: `streak` hacked evaluations in a row end there; `steps`,
    `rewards` and `metrics` hold the baseline of the streak's first evaluation, then the streak."""

    step: int
    streak: int
    steps: list[int]
    rewards: list[float]
    metrics: list[float]

    def describe(self, reward: str, metric: str) -> str:
        """One line: what rose and what fell, over which steps."""
        return (
            f"`{reward}` rose {self.rewards[0]:.4f} → {self.rewards[-1]:.4f} while `{metric}` fell "
            f"{self.metrics[0]:.4f} → {self.metrics[-1]:.4f}: {self.streak} evaluations in a row "
            f"(steps {self.steps[1]}–{self.steps[-1]}) against step {self.steps[0]}"
        )


def firings(evaluations: list[dict[str, Any]], config: MonitorConfig, metric: str) -> list[Firing]:
    """Every evaluation at which the rule fires (see the module doc), oldest first."""
    history = monitored(evaluations)
    runs = streaks(history, config.reward, metric, config.min_delta, config.baseline)
    bases = baselines(history, metric, config.baseline)
    out = []
    for i, streak in enumerate(runs):
        if streak >= config.patience:
            first = i - streak + 1
            window = [history[bases[first]], *history[first : i + 1]]
            pairs = [values(e, config.reward, metric) for e in window]
            out.append(Firing(history[i]["step"], streak, [e["step"] for e in window],
                              [r for r, _ in pairs], [m for _, m in pairs]))  # fmt: skip
    return out


def best(evaluations: list[dict[str, Any]], metric: str) -> dict[str, Any] | None:
    """`{"step", "metric", "value"}` of the evaluation with the highest `metric` (the earliest of equals)."""
    top: dict[str, Any] | None = None
    for evaluation in monitored(evaluations):
        value = evaluation["metrics"].get(metric)
        if value is not None and (top is None or float(value) > top["value"]):
            top = {"step": evaluation["step"], "metric": metric, "value": float(value)}
    return top


@dataclass(frozen=True)
class Assessment:
    """What the newest evaluation means: `best` (the best so far), whether it is `new_best`, and the
    `firing` that ends at it (None when the rule does not fire there)."""

    best: dict[str, Any]
    new_best: bool
    firing: Firing | None


def assess(evaluations: list[dict[str, Any]], config: MonitorConfig, metric: str) -> Assessment:
    """The monitor's verdict on the newest evaluation of `evaluations` (checking that every evaluation
    has both metrics)."""
    history = monitored(evaluations)
    newest = history[-1]
    fired = [f for f in firings(history, config, metric) if f.step == newest["step"]]
    top = best(history, metric)
    assert top is not None  # `firings` checked that every evaluation has the metric
    return Assessment(top, new_best=top["step"] == newest["step"], firing=fired[-1] if fired else None)


def event(firing: Firing, config: MonitorConfig, metric: str, top: dict[str, Any]) -> dict[str, Any]:
    """The JSON record of a firing kept in `TrainerState.monitor` (and listed by the report)."""
    message = firing.describe(config.reward, metric)
    record: dict[str, Any] = {"step": firing.step, "action": config.action, "message": message}
    if config.action == "stop":
        record["best"] = dict(top)
    return record


def stop_line(record: dict[str, Any]) -> str:
    """The sentence the report and the console give for a stop event."""
    top = record["best"]
    return (
        f"stopped by the monitor at step {record['step']}; final weights are from step {top['step']} "
        f"({top['metric']} = {top['value']:.4f})"
    )


def write_best(run_dir: Path, weights: dict[str, torch.Tensor], top: dict[str, Any]) -> None:
    """`best/trainable.safetensors` and `best/best.json`, replacing the folder in one rename."""
    with atomic_directory(run_dir / BEST_DIR) as tmp:
        save_file(weights, str(tmp / BEST_WEIGHTS))
        atomic_write_json(tmp / BEST_JSON, top)


def read_best(run_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """`(best.json, weights)` of `best/`."""
    folder = run_dir / BEST_DIR
    return json.loads((folder / BEST_JSON).read_text()), load_file(str(folder / BEST_WEIGHTS))
