"""SIGKILL at the moments that write or delete folders: during pair generation, while an old checkpoint
is being deleted, and during the final save; and, for online RL, inside a rollout and inside an
optimizer step. The same command run again cleans up what the kill left and ends with the weights and
pairs of a run that was never interrupted. Each killed run is a child process (`tests/cli_child.py`)
that a `kill_at_*` patch makes SIGKILL itself at its moment."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import mmalign
from mmalign.cli import main
from mmalign.config import load_config
from tests.cli_child import run_cli
from tests.conftest import tiny_run_overrides

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "image" / "diffusion_dpo.yaml"


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at_pairs() -> None:
    """SIGKILL after the third candidate image is written into the half-built pair folder."""
    real_save, written = Image.Image.save, []

    def save(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)
        if "/.tmp-" in str(fp):
            written.append(fp)
            if len(written) == 3:
                _die()

    Image.Image.save = save


def kill_at_prune() -> None:
    """SIGKILL once one file of the old checkpoint is deleted and the rest are not yet."""
    real_rmtree = shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if Path(path).name.startswith(".tmp-delete-"):
            next(p for p in Path(path).iterdir() if p.is_file()).unlink()
            _die()
        return real_rmtree(path, *args, **kwargs)

    shutil.rmtree = rmtree


def kill_at_final() -> None:
    """SIGKILL when the final folder is written and not yet renamed into place."""
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(src).name.startswith(".tmp-final-"):
            _die()
        return real_replace(src, dst, *args, **kwargs)

    os.replace = replace


def kill_at_rollout() -> None:
    """SIGKILL inside the third rollout's sampling loop."""
    from mmalign.models.diffusion import DiffusionModel

    real_trajectory, real_prediction, calls = DiffusionModel.sample_trajectory, DiffusionModel.guided_prediction, []

    def sample_trajectory(self, *args, **kwargs):
        calls.append("rollout")
        return real_trajectory(self, *args, **kwargs)

    def guided_prediction(self, *args, **kwargs):
        if calls.count("rollout") == 3:
            calls.append("prediction")
            if calls.count("prediction") == 2:
                _die()
        return real_prediction(self, *args, **kwargs)

    DiffusionModel.sample_trajectory, DiffusionModel.guided_prediction = sample_trajectory, guided_prediction


def kill_at_update() -> None:
    """SIGKILL inside the child's first optimizer step, before it writes the weights."""
    torch.optim.AdamW.step = lambda self, *args, **kwargs: _die()


def leftovers(*roots: Path) -> list[str]:
    return sorted(p.name for root in roots for p in root.rglob(".*") if p.name.startswith((".tmp-", ".old-")))


def run_killed_at(moment: Callable[[], None], args: list[str], log: Path) -> None:
    """Run the CLI in a child that `moment` makes SIGKILL itself."""
    code = run_cli(args, log, moment)
    assert code == -9, f"the run was not killed at {moment.__name__}: {log.read_text()[-2000:]}"


@pytest.mark.slow
def test_kills_while_writing_or_deleting_folders_resume_to_the_uninterrupted_result(tiny_pipelines, tmp_path):
    def overrides(name: str) -> list[str]:
        out, cache = tmp_path / name, tmp_path / f"cache-{name}"
        return [
            *tiny_run_overrides(tiny_pipelines["sd"], Path("embedded:shapes-prefs"), out, steps=4),
            f"data.cache_dir={cache}",
            "data.embedded.prompts=8",
            "data.embedded.candidates=2",
            "data.embedded.num_steps=2",
            "data.embedded.min_margin=0",
            "train.keep_checkpoints=1",
            "train.learning_rate=1e-3",
            "eval.num_prompts=2",
        ]

    straight = tmp_path / "straight"
    mmalign.train(load_config(RECIPE, overrides("straight")))

    killed, cache = tmp_path / "killed", tmp_path / "cache-killed"
    args = ["train", str(RECIPE), *overrides("killed")]
    run_killed_at(kill_at_pairs, args, tmp_path / "pairs.log")
    assert [p.name for p in (cache / "shapes-prefs").iterdir() if not p.name.endswith(".lock")][0].startswith(".tmp-")
    assert not list((cache / "shapes-prefs").glob("*/pairs.jsonl"))  # nothing looks complete

    run_killed_at(
        kill_at_prune, args, tmp_path / "prune.log"
    )  # the pairs are built again; the kill comes while step 2 is deleted
    assert leftovers(cache) == []
    checkpoints = killed / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".tmp-delete-step-000002", "step-000004"]

    run_killed_at(kill_at_final, args, tmp_path / "final.log")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000004"]
    assert [p.name for p in killed.iterdir() if p.name.startswith(".tmp-final-")]
    assert not (killed / "final").exists() and not (killed / "report.json").exists()

    assert main(args) == 0
    assert leftovers(killed, cache) == []
    a = load_file(str(straight / "final" / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(killed / "final" / "lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pairs_a = next((tmp_path / "cache-straight" / "shapes-prefs").glob("*/pairs.jsonl"))
    pairs_b = next((cache / "shapes-prefs").glob("*/pairs.jsonl"))
    assert pairs_a.read_bytes() == pairs_b.read_bytes()


@pytest.mark.slow
def test_online_rl_killed_mid_rollout_or_mid_update_resumes_to_the_same_weights(
    tiny_pipelines, tiny_clip_dir, tmp_path
):
    recipe = RECIPE.parent / "flow_grpo.yaml"

    def args(name: str) -> list[str]:
        return ["train", str(recipe), f"model={tiny_pipelines['sd3']}", "model.lora_rank=4",
                f"output_dir={tmp_path / name}", "train.max_steps=4", "train.batch_size=2",
                "train.checkpoint_every=2", "train.learning_rate=1e-2", "train.threads=1", "eval.every=0",
                "eval.num_prompts=2", "eval.num_steps=2", "eval.rewards=[]", "eval.monitor.action=off",
                "flow_grpo.group_size=2", "flow_grpo.num_steps=3",
                f"flow_grpo.reward_args={{path: {tiny_clip_dir}}}"]  # fmt: skip

    assert main(args("straight")) == 0
    killed = tmp_path / "killed"
    run_killed_at(
        kill_at_rollout, args("killed"), tmp_path / "rollout.log"
    )  # during step 3's rollout, after the step-2 checkpoint
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-000002"]
    run_killed_at(
        kill_at_update, args("killed"), tmp_path / "update.log"
    )  # resumed at step 2, killed inside step 3's optimizer step
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-000002"]
    assert main(args("killed")) == 0
    a = load_file(str(tmp_path / "straight" / "final" / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(killed / "final" / "lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
