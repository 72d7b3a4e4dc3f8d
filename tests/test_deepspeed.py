"""Two CPU processes under DeepSpeed ZeRO-2 (`accelerate launch --config_file configs/accelerate/zero2.yaml`,
gloo) train like one process on the same global batch, write the files one process writes, and resume
from a checkpoint to the same weights and optimizer state, bit for bit, as the run that was not
interrupted. Two launches in all (they are slow): the uninterrupted run, and a resume of its step-2
checkpoint."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType
from safetensors.torch import load_file

from mmalign.cli import main
from mmalign.config import ConfigError, TrainConfig
from mmalign.models.diffusion import load_pipeline
from mmalign.models.lora import load_lora
from mmalign.train import sharding
from tests.conftest import tiny_run_overrides

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "image" / "diffusion_dpo.yaml"
LORA = Path("final") / "lora" / "pytorch_lora_weights.safetensors"
STEPS = 4
EXTRA = ["train.learning_rate=1e-3", "train.keep_checkpoints=2", "train.max_grad_norm=0.05"]


def launch_zero2(args: list[str], port: int) -> subprocess.CompletedProcess:
    """`accelerate launch` 2 CPU processes with the shipped ZeRO-2 config."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "configs" / "accelerate" / "zero2.yaml"), "--num_processes", "2", "--main_process_port",
              str(port)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([*launch, "-m", "mmalign.cli", *args], capture_output=True, text=True, env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def zero_runs(tiny_pipelines, tmp_path_factory) -> tuple[Path, Path, Path, subprocess.CompletedProcess]:
    """A 4-step LoRA Diffusion-DPO run on a tiny SD pipeline (gradients clipped, so the clipping path
    counts): on one process; on 2 ZeRO-2 processes; and the ZeRO-2 run resumed from its step-2
    checkpoint. Returns the three run folders and the resuming launch."""
    from tests.conftest import write_pair_folder

    root = tmp_path_factory.mktemp("zero2")
    pairs = write_pair_folder(root / "pairs")

    def args(out: Path) -> list[str]:
        return ["train", str(RECIPE), *tiny_run_overrides(tiny_pipelines["sd"], pairs, out, STEPS), *EXTRA]

    one, two, resumed = root / "one", root / "zero2", root / "resumed"
    assert main(args(one)) == 0
    run = launch_zero2(args(resumed), 29541)
    assert run.returncode == 0, run.stderr[-3000:]
    shutil.copytree(resumed, two)  # the uninterrupted run; `resumed` goes back to its step-2 checkpoint
    for finished in (resumed / "checkpoints" / f"step-{STEPS:06d}", resumed / "final"):
        shutil.rmtree(finished)
    restart = launch_zero2(args(resumed), 29542)
    assert restart.returncode == 0, restart.stderr[-3000:]
    return one, two, resumed, restart


def _checkpoint(run: Path, step: int, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step-{step:06d}" / f"{name}.safetensors"))


@pytest.mark.slow
def test_zero2_two_processes_match_one_and_write_the_same_files(zero_runs, tiny_pipelines):
    one, two, _, _ = zero_runs
    assert json.loads((two / "report.json").read_text())["num_processes"] == 2
    logs = [json.loads((run / "checkpoints" / f"step-{STEPS:06d}" / "trainer_state.json").read_text())["train_log"]
            for run in (one, two)]  # fmt: skip
    assert [e["loss"] for e in logs[1]] == pytest.approx([e["loss"] for e in logs[0]], rel=1e-3)
    assert [e["grad_norm"] for e in logs[1]] == pytest.approx([e["grad_norm"] for e in logs[0]], rel=1e-3)
    for step in (2, STEPS):
        for name in ("trainable", "optimizer"):
            a, b = _checkpoint(one, step, name), _checkpoint(two, step, name)
            assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
            assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a), name
        skeleton = [json.loads((run / "checkpoints" / f"step-{step:06d}" / "optimizer.json").read_text())
                    for run in (one, two)]  # fmt: skip
        assert skeleton[0] == skeleton[1]
    load_lora(load_pipeline(tiny_pipelines["sd"]), two / LORA.parent)  # every tensor finds its layer


@pytest.mark.slow
def test_zero2_resume_ends_bit_for_bit_where_the_uninterrupted_run_ends(zero_runs):
    _, two, resumed, restart = zero_runs
    assert "resumed from" in restart.stdout + restart.stderr
    for name in ("trainable", "optimizer"):
        a, b = _checkpoint(two, STEPS, name), _checkpoint(resumed, STEPS, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    a, b = load_file(str(two / LORA)), load_file(str(resumed / LORA))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _deepspeed_launch(zero_optimization: dict) -> SimpleNamespace:
    plugin = SimpleNamespace(deepspeed_config={"zero_optimization": zero_optimization})
    return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED, state=SimpleNamespace(deepspeed_plugin=plugin))


@pytest.mark.parametrize(
    ("zero_optimization", "train", "named"),
    [
        ({"stage": 3}, {}, "stage 3"),
        ({"stage": 0}, {}, "stage 0"),
        ({"stage": 2, "offload_optimizer": {"device": "cpu"}}, {}, "offload_optimizer"),
        ({"stage": 2}, {"optimizer": "adamw8bit"}, "train.optimizer"),
    ],
)
def test_deepspeed_setups_it_cannot_train_exactly_are_refused(zero_optimization, train, named):
    with pytest.raises(ConfigError, match=named):
        sharding.check_supported(_deepspeed_launch(zero_optimization), TrainConfig(**train))
    sharding.check_supported(_deepspeed_launch({"stage": 2}), TrainConfig())
