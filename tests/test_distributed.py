"""Two processes through `accelerate launch` (gloo on CPU) train like one with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmalign.cli import main
from tests.conftest import tiny_run_overrides

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "image" / "diffusion_dpo.yaml"


@pytest.mark.slow
def test_two_processes_match_one(tiny_pipelines, pair_folder, tmp_path):
    steps = 6
    extra = ["train.checkpoint_every=0", "train.learning_rate=1e-3"]
    one, two = tmp_path / "one", tmp_path / "two"
    train = ["-m", "mmalign.cli", "train", str(RECIPE)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # the one-process run in this process (`train.threads=1`, as the launched processes have)
    assert main(["train", str(RECIPE), *tiny_run_overrides(tiny_pipelines["sd"], pair_folder, one, steps), *extra]) == 0
    # accelerate's `--cpu` launcher is single-process without MPI; its torchrun launcher spawns the
    # processes, and the trainer puts them on the CPU (gloo) when no accelerator is present.
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29517",
    ]
    result = subprocess.run(
        [*launch, *train, *tiny_run_overrides(tiny_pipelines["sd"], pair_folder, two, steps), *extra],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    report_one = json.loads((one / "report.json").read_text())
    report_two = json.loads((two / "report.json").read_text())
    assert report_one["num_processes"] == 1 and report_two["num_processes"] == 2
    log_one = json.loads((one / "evaluations.json").read_text())
    assert log_one  # evaluation ran on the main process only, once per evaluation step
    losses_one = [e["loss"] for e in _train_log(one)]
    losses_two = [e["loss"] for e in _train_log(two)]
    assert len(losses_one) == len(losses_two) == steps
    assert losses_one == pytest.approx(losses_two, rel=1e-3)
    a = load_file(str(one / "final" / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(two / "final" / "lora" / "pytorch_lora_weights.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)


def _train_log(run: Path) -> list[dict]:
    checkpoints = sorted((run / "checkpoints").glob("step-*"))
    return json.loads((checkpoints[-1] / "trainer_state.json").read_text())["train_log"]
