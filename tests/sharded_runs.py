"""The runs the sharded-training tests compare (`test_fsdp.py`, `test_deepspeed.py`): a 4-step LoRA
Diffusion-DPO run on a tiny SD pipeline on one process, the same run on 2 CPU processes launched with a
shipped accelerate config, and that run resumed from its step-2 checkpoint; and the checks that the
launched runs match the one-process run and that the resumed run ends bit for bit where the
uninterrupted one does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmalign.cli import main
from mmalign.models.diffusion import load_pipeline
from mmalign.models.lora import load_lora
from tests.conftest import tiny_run_overrides, write_pair_folder

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "image" / "diffusion_dpo.yaml"
LORA = Path("final") / "lora" / "pytorch_lora_weights.safetensors"
STEPS = 4


@dataclass
class ShardedRuns:
    """The run folders: `one` (one process), `two` (2 launched processes, uninterrupted) and `resumed` (the
    launched run resumed from its step-2 checkpoint), and the output of the resuming launch."""

    one: Path
    two: Path
    resumed: Path
    restart: subprocess.CompletedProcess


def launch(config: str, args: list[str], port: int) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file configs/accelerate/<config>` on 2 CPU processes running the CLI
    (for a DeepSpeed config, `tests/deepspeed_cli.py`)."""
    program = [str(ROOT / "tests" / "deepspeed_cli.py")] if config.startswith("zero") else ["-m", "mmalign.cli"]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / config), "--num_processes", "2", "--main_process_port",
               str(port), *program, *args]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)


def sharded_runs(config: str, sd_pipeline: Path, root: Path, extra: list[str], port: int) -> ShardedRuns:
    """Train the one-process run in this process and launch the other two with `config` (ports `port` and
    `port + 1`); `extra`: overrides added to every run."""
    pairs = write_pair_folder(root / "pairs")

    def args(out: Path) -> list[str]:
        return ["train", str(RECIPE), *tiny_run_overrides(sd_pipeline, pairs, out, STEPS),
                "train.learning_rate=1e-3", "train.keep_checkpoints=2", *extra]  # fmt: skip

    one, two, resumed = root / "one", root / "two", root / "resumed"
    assert main(args(one)) == 0
    first = launch(config, args(resumed), port)
    assert first.returncode == 0, first.stderr[-3000:]
    shutil.copytree(resumed, two)  # the uninterrupted run; `resumed` goes back to its step-2 checkpoint
    for finished in (resumed / "checkpoints" / f"step-{STEPS:06d}", resumed / "final"):
        shutil.rmtree(finished)
    restart = launch(config, args(resumed), port + 1)
    assert restart.returncode == 0, restart.stderr[-3000:]
    return ShardedRuns(one, two, resumed, restart)


def checkpoint_file(run: Path, step: int, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step-{step:06d}" / f"{name}.safetensors"))


def train_log(run: Path) -> list[dict]:
    return json.loads((run / "checkpoints" / f"step-{STEPS:06d}" / "trainer_state.json").read_text())["train_log"]


def differences_from_one_process(
    runs: ShardedRuns, sd_pipeline: Path, logged: tuple[str, ...] = ("loss",)
) -> list[str]:
    """What differs between the launched run and the one-process run (empty when they agree): the
    number of processes the report records, the logged `logged` metrics (rel 1e-3), the checkpoints'
    tensors (names, shapes, atol 1e-4, gathered whole) and optimizer JSON. The launched run's LoRA
    adapter is loaded into the pipeline (every tensor must find its layer)."""
    found = []
    if json.loads((runs.two / "report.json").read_text())["num_processes"] != 2:
        found.append("report.json: num_processes")
    for key in logged:
        one, two = ([e[key] for e in train_log(run)] for run in (runs.one, runs.two))
        if len(two) != STEPS or two != pytest.approx(one, rel=1e-3):
            found.append(f"train_log {key}: {two} against {one}")
    for step in (2, STEPS):
        for name in ("trainable", "optimizer"):
            a, b = checkpoint_file(runs.one, step, name), checkpoint_file(runs.two, step, name)
            if a.keys() != b.keys() or any(
                a[k].shape != b[k].shape or not torch.allclose(a[k], b[k], atol=1e-4) for k in a
            ):
                found.append(f"step {step} {name}.safetensors")
        skeleton = [json.loads((run / "checkpoints" / f"step-{step:06d}" / "optimizer.json").read_text())
                    for run in (runs.one, runs.two)]  # fmt: skip
        if skeleton[0] != skeleton[1]:
            found.append(f"step {step} optimizer.json")
    load_lora(load_pipeline(sd_pipeline), runs.two / LORA.parent)
    return found


def differences_after_resume(runs: ShardedRuns) -> list[str]:
    """What the resumed run did not do or ends with differently from the uninterrupted run (empty when it
    said it resumed at step 2, logged every step, and ends with the same weights, optimizer state and
    LoRA file, bit for bit)."""
    found = []
    output = runs.restart.stdout + runs.restart.stderr
    if "resumed from" not in output or "step 2" not in output:
        found.append("the resuming launch did not report resuming at step 2")
    if [e["step"] for e in train_log(runs.resumed)] != list(range(1, STEPS + 1)):
        found.append("train_log steps")
    files = {name: (checkpoint_file(runs.two, STEPS, name), checkpoint_file(runs.resumed, STEPS, name))
             for name in ("trainable", "optimizer")}  # fmt: skip
    files["LoRA"] = (load_file(str(runs.two / LORA)), load_file(str(runs.resumed / LORA)))
    for name, (a, b) in files.items():
        if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
            found.append(name)
    return found
