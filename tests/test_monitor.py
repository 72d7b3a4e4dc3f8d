"""The reward-hacking monitor (`eval.monitor`): the rule over the evaluation history, and what the Trainer
does with it (best weights, warnings, stopping, resume), on a tiny method that hacks its reward.

`Hacker` trains three numbers upward (loss = −their sum s, Adam at lr 0.1 moves each by ~0.1 a step);
its evaluation reports the reward s, which always rises, and the gold metric −(s − 1)², which peaks at
step 3 (s ≈ 0.9) and falls from step 4 on. With patience 2 the monitor fires first at step 5.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from mmalign.config import ConfigError, EvalSchedule, MonitorConfig, RunConfig, TrainConfig, load_config
from mmalign.config_help import help_text
from mmalign.train import monitor
from mmalign.train.method import Evaluation, Method
from mmalign.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "image" / "diffusion_dpo.yaml"


# ---------------------------------------------------------------------------- the pure rule
def history(rewards: list[float], golds: list[float], every: int = 10) -> list[dict]:
    return [
        {"step": i * every, "train_seconds": 0.0, "metrics": {"reward": r, "gold": g}}
        for i, (r, g) in enumerate(zip(rewards, golds))
    ]


def fired_at(evaluations: list[dict], **options) -> list[int]:
    return [f.step for f in monitor.firings(evaluations, MonitorConfig(action="warn", **options), "gold")]


def test_the_rule_needs_patience_consecutive_rises_with_falls():
    rewards = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    golds = [0.0, 1.0, 0.9, 1.0, 0.8, 0.7, 0.6]  # falls at 20, then 40, 50, 60
    evaluations = history(rewards, golds)
    for baseline in ("previous", "best"):  # here the evaluation before a fall is always the best one
        assert fired_at(evaluations, patience=1, baseline=baseline) == [20, 40, 50, 60]
        assert fired_at(evaluations, patience=2, baseline=baseline) == [50, 60]  # the fall at 20 is followed by a rise
        assert fired_at(evaluations, patience=3, baseline=baseline) == [60]
        assert fired_at(evaluations, patience=4, baseline=baseline) == []
        assert monitor.streaks(evaluations, "reward", "gold", 0.0, baseline) == [0, 0, 1, 0, 1, 2, 3]
    firing = monitor.firings(evaluations, MonitorConfig(action="warn", patience=2, baseline="previous"), "gold")[0]
    assert firing.steps == [30, 40, 50] and firing.rewards == [3.0, 4.0, 5.0] and firing.metrics == [1.0, 0.8, 0.7]
    assert firing.describe("reward", "gold") == (
        "`reward` rose 3.0000 → 5.0000 while `gold` fell 1.0000 → 0.7000: 2 evaluations in a row "
        "(steps 40–50) against step 30"
    )
    best = monitor.firings(evaluations, MonitorConfig(action="warn", patience=2), "gold")[0]
    assert best.steps == [10, 40, 50] and best.rewards == [1.0, 4.0, 5.0]  # the earliest of the equal bests


def test_the_best_baseline_catches_a_slide_below_the_peak_that_wobbles():
    # the held-out history of DiffusionNFT trained on JPEG incompressibility (docs/results/online.md):
    # the reward rises at every evaluation; gold peaks at step 5 and slides down with rises between falls
    rewards = [1.208, 1.210, 1.215, 1.217, 1.223, 1.231, 1.240]
    golds = [0.646, 0.667, 0.664, 0.667, 0.654, 0.662, 0.635]
    evaluations = history(rewards, golds, every=5)
    assert fired_at(evaluations, baseline="previous") == []  # no two falls in a row
    assert monitor.baselines(evaluations, "gold", "best") == [None, 0, 1, 1, 1, 1, 1]
    assert monitor.streaks(evaluations, "reward", "gold", 0.0, "best") == [0, 0, 1, 0, 1, 2, 3]
    assert fired_at(evaluations) == [25, 30]  # `best` is the default; 0.005 below the peak at step 25
    firing = monitor.firings(evaluations, MonitorConfig(action="warn"), "gold")[0]
    assert firing.steps == [5, 20, 25] and firing.metrics == [0.667, 0.654, 0.662]
    assert fired_at(evaluations, patience=1, min_delta=0.006) == [20, 30]  # steps 10 and 25 are within 0.006


def test_rises_without_falls_and_falls_without_rises_do_not_fire():
    for baseline in ("previous", "best"):
        assert fired_at(history([0, 1, 2, 3, 4], [0, 1, 2, 3, 4]), patience=1, baseline=baseline) == []  # both rise
        assert fired_at(history([0, 1, 2, 3, 4], [0, 0, 0, 0, 0]), patience=1, baseline=baseline) == []  # gold flat
        assert fired_at(history([4, 3, 2, 1, 0], [4, 3, 2, 1, 0]), patience=1, baseline=baseline) == []  # both fall
        assert fired_at(history([0, 0, 0, 0, 0], [4, 3, 2, 1, 0]), patience=1, baseline=baseline) == []  # reward flat


def test_min_delta_ignores_small_changes():
    evaluations = history([0.0, 0.05, 0.5, 1.0], [1.0, 0.99, 0.5, 0.0])
    assert fired_at(evaluations, patience=1, baseline="previous") == [10, 20, 30]
    assert fired_at(evaluations, patience=1, baseline="previous", min_delta=0.1) == [20, 30]  # step 10 moved < 0.1
    assert fired_at(evaluations, patience=3, baseline="previous", min_delta=0.1) == []
    assert fired_at(evaluations, patience=1, min_delta=0.1) == [20, 30]  # against the best, step 0


def test_best_passes_over_the_evaluation_of_restored_weights():
    evaluations = history([0, 1, 2, 3], [0.1, 0.5, 0.3, 0.5])
    assert monitor.best(evaluations, "gold") == {"step": 10, "metric": "gold", "value": 0.5}  # earliest of equals
    restored = {"step": 30, "train_seconds": 0.0, "metrics": {"reward": 9.0, "gold": 9.0}, "restored_from": 10}
    assert monitor.best([*evaluations, restored], "gold")["step"] == 10
    assert fired_at([*history([0, 1, 2], [2, 1, 0]), restored], patience=2) == [20]


@pytest.mark.parametrize(
    ("options", "key"),
    [({"reward": "train_reward"}, "eval.monitor.reward='train_reward'"), ({}, "eval.monitor.metric='heldout'")],
)
def test_a_missing_metric_is_an_error_naming_the_key_and_the_metrics(options, key):
    with pytest.raises(ConfigError) as caught:
        monitor.firings(history([0, 1], [1, 0]), MonitorConfig(action="warn", **options), "heldout")
    message = str(caught.value)
    assert key in message and "step 0, which has: reward, gold" in message and "\n" not in message


# ---------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("eval.monitor.action=halt", "config key 'eval.monitor.action' must be one of off, warn, stop, got 'halt'"),
        ("eval.monitor.patience=0", "config key 'eval.monitor.patience' must be ≥ 1, got 0"),
        ("eval.monitor.baseline=last", "eval.monitor.baseline"),
        ("eval.monitor.min_delta=-0.1", "config key 'eval.monitor.min_delta' must be ≥ 0"),
        ("eval.monitor.metric=shapes-gold", None),
        ("eval.monitor.reward=shapes-gold", None),
        ("eval.monitor.metric=clip-score", "'eval.monitor.metric' must differ from eval.monitor.reward"),
    ],
)
def test_monitor_options_are_checked_naming_the_key(override, message):
    overrides = [override, "eval.monitor.reward=clip-score"] if message and "differ" in message else [override]
    if message is None:
        assert load_config(RECIPE, overrides).eval.monitor is not None
        return
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(RECIPE, overrides)


def test_every_method_help_lists_the_monitor_options():
    text = help_text("diffusion-dpo")
    for key in ("action", "reward", "metric", "baseline", "patience", "min_delta"):
        assert f"eval.monitor.{key} = " in text
    assert load_config(RECIPE).eval.monitor == MonitorConfig()  # off by default


# ---------------------------------------------------------------------------- the Trainer
@dataclass
class HackerConfig:
    turn: float = 1.0  # the gold metric −(s − turn)² peaks where the summed weights reach `turn`


class Crash(Exception):
    """Stands for a kill: the run ends there, with what it wrote so far."""


class Hacker(Method):
    """Three trainable numbers pushed up by the loss; see the module doc."""

    config_class = HackerConfig
    eval_config_class = EvalSchedule
    crash: str | None = None  # "step-N" (before optimizer step N+1) or "final" (in save_final)

    def setup(self, accelerator) -> None:
        self.net = torch.nn.Linear(2, 1)
        torch.nn.init.zeros_(self.net.weight)
        torch.nn.init.zeros_(self.net.bias)
        self.net.to(accelerator.device)

    def trainable_module(self) -> torch.nn.Module:
        return self.net

    def next_batch(self, step: int, micro: int) -> torch.Tensor:
        return torch.ones(1, 2, device=self.net.weight.device)

    def compute_loss(self, batch, step, micro):
        if self.crash == f"step-{step}":
            raise Crash(self.crash)
        return -self.module(batch).mean(), {}

    def evaluate(self, step: int) -> Evaluation:
        with torch.no_grad():
            s = float(self.net(torch.ones(1, 2, device=self.net.weight.device)).item())
        grid = Image.new("RGB", (4, 4), (min(255, int(50 * s)), 0, 0))  # a picture of the weights
        return Evaluation({"reward": s, "gold": -((s - self.config.turn) ** 2)}, grid=grid)

    def gold_metric(self) -> str:
        return "gold"

    def save_final(self, directory: Path) -> list[str]:
        if self.crash == "final":
            raise Crash("final")
        save_file(self.trainable_state_dict(), str(directory / "trainable.safetensors"))
        return ["trainable.safetensors"]


def hacker_run(out: Path, action: str = "stop", steps: int = 8, processes: int = 1, **options) -> RunConfig:
    train = TrainConfig(
        max_steps=steps,
        batch_size=processes,
        learning_rate=0.1,
        lr_scheduler="constant",
        weight_decay=0.0,
        log_every=1,
        checkpoint_every=1,
        keep_checkpoints=100,
        threads=1,
    )
    return RunConfig(
        method="hacker",
        recipe="hacker",
        output_dir=str(out),
        model=None,
        data=None,
        train=train,
        eval=EvalSchedule(every=1, monitor=MonitorConfig(action=action, **options)),
        method_args=HackerConfig(),
    )


def train(run: RunConfig, crash: str | None = None) -> dict:
    method = Hacker(run)
    method.crash = crash
    return Trainer(run, method).train()


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def without_time(evaluations: list[dict]) -> list[dict]:
    return [{k: v for k, v in e.items() if k != "train_seconds"} for e in evaluations]


def test_stop_ends_early_and_final_holds_the_best_weights(tmp_path, capsys):
    out = tmp_path / "run"
    report = train(hacker_run(out, "stop"))
    evaluations = json.loads((out / "evaluations.json").read_text())
    golds = {e["step"]: e["metrics"]["gold"] for e in evaluations if "restored_from" not in e}
    assert list(golds) == [0, 1, 2, 3, 4, 5]  # stopped at step 5 of 8
    assert report["steps"] == 5 and max(golds, key=golds.get) == 3
    best = json.loads((out / "best" / "best.json").read_text())
    assert best == {"step": 3, "metric": "gold", "value": golds[3]}
    step3 = weights(out / "checkpoints" / "step-000003" / "trainable.safetensors")
    assert same(weights(out / "final" / "trainable.safetensors"), step3)
    assert same(weights(out / "best" / "trainable.safetensors"), step3)
    assert not same(weights(out / "checkpoints" / "step-000005" / "trainable.safetensors"), step3)
    # the final evaluation is of the restored weights: the best evaluation's metrics again
    assert evaluations[-1]["restored_from"] == 3 and evaluations[-1]["metrics"] == evaluations[3]["metrics"]
    assert report["after"] == golds[3]
    line = f"stopped by the monitor at step 5; final weights are from step 3 (gold = {golds[3]:.4f})"
    assert report["monitor"]["stopped"]["message"] == line
    assert [e["step"] for e in report["monitor"]["events"]] == [5]
    md = (out / "report.md").read_text()
    assert line[0].upper() + line[1:] in md and "## Reward-hacking monitor" in md and report["monitor"]["plot"] in md
    assert (out / "plots" / "monitor.png").is_file()
    assert line in capsys.readouterr().out
    # the grid of the stopped weights stays beside that of the restored ones, which the comparison shows
    stopped, restored = out / "samples" / "step-000005.png", out / "samples" / "step-000005-best-000003.png"
    assert Image.open(stopped).getpixel((0, 0)) != Image.open(restored).getpixel((0, 0))
    assert Image.open(restored).getpixel((0, 0)) == Image.open(out / "samples" / "step-000003.png").getpixel((0, 0))
    assert report["samples"]["after"] == "samples/step-000005-best-000003.png"


def test_warn_finishes_the_run_and_lists_every_firing(tmp_path, capsys):
    out = tmp_path / "run"
    report = train(hacker_run(out, "warn"))
    assert report["steps"] == 8
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning: reward hacking?")]
    assert [e["step"] for e in report["monitor"]["events"]] == [5, 6, 7, 8]  # 8: the final evaluation
    assert len(printed) == 4 and "at step 5, `reward` rose" in printed[0]
    assert all(e["action"] == "warn" for e in report["monitor"]["events"]) and report["monitor"]["stopped"] is None
    state = json.loads((out / "checkpoints" / "step-000008" / "trainer_state.json").read_text())
    assert [e["step"] for e in state["monitor"]] == [5, 6, 7]  # checkpointed before the final evaluation
    md = (out / "report.md").read_text()
    assert md.count("fired (warning)") == 4 and "- step 5 (warn): `reward` rose" in md
    assert "stopped by the monitor" not in md.lower()
    # final/ is the last step's; best/ the best evaluation's
    assert same(weights(out / "final" / "trainable.safetensors"), weights(out / "checkpoints" / "step-000008" /
                                                                           "trainable.safetensors"))  # fmt: skip
    assert same(weights(out / "best" / "trainable.safetensors"), weights(out / "checkpoints" / "step-000003" /
                                                                         "trainable.safetensors"))  # fmt: skip
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = EventAccumulator(str(out / "logs"))
    logs.Reload()
    hacking = {e.step: e.value for e in logs.Scalars(monitor.HACKING_TAG)}
    assert hacking == {step: float(step >= 5) for step in range(9)}


def test_off_writes_no_best_and_no_monitor_section(tmp_path):
    out = tmp_path / "run"
    report = train(hacker_run(out, "off", steps=3))
    assert not (out / "best").exists() and not (out / "plots").exists()
    assert "monitor" not in report and "Reward-hacking monitor" not in (out / "report.md").read_text()


def test_a_missing_metric_stops_the_run_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"eval.monitor.reward='heldout_reward' is not a metric .* reward, gold"):
        train(hacker_run(tmp_path / "run", "warn", reward="heldout_reward"))


@pytest.mark.parametrize("crash", ["step-3", "step-4", "final"])
def test_a_crashed_run_resumes_to_the_same_decision(tmp_path, crash):
    straight = tmp_path / "straight"
    expected = train(hacker_run(straight, "stop"))
    out = tmp_path / "crashed"
    # checkpoints every 2 steps: a crash before step 5 resumes from step 4, past the best of step 3;
    # a crash in the final save resumes from the checkpoint written at the stop
    run = hacker_run(out, "stop")
    run.train.checkpoint_every = 2
    with pytest.raises(Crash):
        train(run, crash)
    assert not (out / "final").exists() and (out / "best" / "best.json").is_file()
    report = train(run)
    assert report["monitor"]["events"] == expected["monitor"]["events"]
    assert report["monitor"]["stopped"] == expected["monitor"]["stopped"]
    assert without_time(report["evaluations"]) == without_time(expected["evaluations"])
    assert (out / "best" / "best.json").read_text() == (straight / "best" / "best.json").read_text()
    assert same(weights(out / "final" / "trainable.safetensors"), weights(straight / "final" / "trainable.safetensors"))
    # a finished stopped run run again resumes at the stop and ends the same
    again = train(run)
    assert without_time(again["evaluations"]) == without_time(expected["evaluations"])


LAUNCHED = """
import sys
from pathlib import Path
from tests.test_monitor import hacker_run, train
train(hacker_run(Path(sys.argv[1]), "stop", processes=2))
"""


@pytest.mark.slow
def test_two_processes_stop_together(tmp_path):
    """Only the main process evaluates; the stop reaches the other one, which restores the best weights
    too (a process left in the loop would hang the run)."""
    one, two = tmp_path / "one", tmp_path / "two"
    train(hacker_run(one, "stop", processes=2))
    script = tmp_path / "launched.py"
    script.write_text(LAUNCHED)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
              "--main_process_port", "29523"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run([*launch, str(script), str(two)], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report_one = json.loads((one / "report.json").read_text())
    report_two = json.loads((two / "report.json").read_text())
    assert report_two["num_processes"] == 2 and report_two["steps"] == report_one["steps"] == 5
    assert report_two["monitor"]["stopped"]["best"]["step"] == 3
    assert same(weights(two / "final" / "trainable.safetensors"), weights(one / "final" / "trainable.safetensors"))
