"""Two CPU processes under FSDP2 (`accelerate launch --config_file configs/accelerate/fsdp.yaml`, gloo) train
like one process on the same global batch, write the files one process writes, and resume after a
kill inside a step to the weights and optimizer state of the run that was not interrupted, bit for
bit. Three launches in all (they are slow): the uninterrupted run, the killed one and the one that
resumes it."""

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
from mmalign.models.diffusion import load_pipeline
from mmalign.models.lora import load_lora
from tests.conftest import tiny_run_overrides

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "image" / "diffusion_dpo.yaml"
LORA = Path("final") / "lora" / "pytorch_lora_weights.safetensors"
STEPS = 4
EXTRA = ["train.learning_rate=1e-3", "train.keep_checkpoints=2"]

#: The CLI, with this process SIGKILLed inside its third optimizer step (after the step-2 checkpoint).
KILLED_IN_STEP_3 = r"""
import os, signal, sys
import torch
real_step, calls = torch.optim.AdamW.step, []
def step(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 3 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return real_step(self, *args, **kwargs)
torch.optim.AdamW.step = step
from mmalign.cli import main
sys.exit(main(sys.argv[1:]))
"""


def launch_fsdp(program: list[str], args: list[str], port: int) -> subprocess.CompletedProcess:
    """`accelerate launch` 2 CPU processes with the shipped FSDP config."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "2", "--main_process_port",
              str(port)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([*launch, *program, *args], capture_output=True, text=True, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def fsdp_runs(tiny_pipelines, tmp_path_factory) -> tuple[Path, Path, Path, subprocess.CompletedProcess]:
    """A 4-step LoRA Diffusion-DPO run on a tiny SD pipeline: on one process; on 2 FSDP processes; and on
    2 FSDP processes whose first launch is killed inside step 3 and whose second resumes it. Returns the
    three run folders and the resuming launch."""
    from tests.conftest import write_pair_folder

    root = tmp_path_factory.mktemp("fsdp")
    pairs = write_pair_folder(root / "pairs")

    def args(out: Path) -> list[str]:
        return ["train", str(RECIPE), *tiny_run_overrides(tiny_pipelines["sd"], pairs, out, STEPS), *EXTRA]

    one, two, killed = root / "one", root / "fsdp", root / "killed"
    assert main(args(one)) == 0
    uninterrupted = launch_fsdp(["-m", "mmalign.cli"], args(two), 29530)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    script = root / "killed_in_step_3.py"
    script.write_text(KILLED_IN_STEP_3)
    assert launch_fsdp([str(script)], args(killed), 29531).returncode != 0
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-000002"]
    assert not (killed / "final").exists()
    resumed = launch_fsdp(["-m", "mmalign.cli"], args(killed), 29532)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    return one, two, killed, resumed


def _train_log(run: Path) -> list[dict]:
    return json.loads((run / "checkpoints" / f"step-{STEPS:06d}" / "trainer_state.json").read_text())["train_log"]


@pytest.mark.slow
def test_fsdp_two_processes_match_one_and_write_the_same_files(fsdp_runs, tiny_pipelines):
    one, two, _, _ = fsdp_runs
    assert json.loads((two / "report.json").read_text())["num_processes"] == 2
    losses_one, losses_two = [e["loss"] for e in _train_log(one)], [e["loss"] for e in _train_log(two)]
    assert len(losses_two) == STEPS and losses_two == pytest.approx(losses_one, rel=1e-3)
    # the checkpoints hold the same tensors under the same names and shapes, gathered whole
    for step in (2, STEPS):
        for name in ("trainable", "optimizer"):
            a = load_file(str(one / "checkpoints" / f"step-{step:06d}" / f"{name}.safetensors"))
            b = load_file(str(two / "checkpoints" / f"step-{step:06d}" / f"{name}.safetensors"))
            assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
            assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a), name
        skeleton = [json.loads((run / "checkpoints" / f"step-{step:06d}" / "optimizer.json").read_text())
                    for run in (one, two)]  # fmt: skip
        assert skeleton[0] == skeleton[1]
    load_lora(load_pipeline(tiny_pipelines["sd"]), two / LORA.parent)  # every tensor finds its layer


@pytest.mark.slow
def test_fsdp_run_killed_in_a_step_resumes_bit_for_bit(fsdp_runs):
    _, two, killed, resumed = fsdp_runs
    assert "resumed from" in resumed.stdout + resumed.stderr and "step 2" in resumed.stdout + resumed.stderr
    assert [e["step"] for e in _train_log(killed)] == list(range(1, STEPS + 1))
    assert not [p for p in killed.rglob(".tmp-*")]
    for name in ("trainable", "optimizer"):
        a, b = (
            load_file(str(run / "checkpoints" / f"step-{STEPS:06d}" / f"{name}.safetensors")) for run in (two, killed)
        )
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a, b = load_file(str(two / LORA)), load_file(str(killed / LORA))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
