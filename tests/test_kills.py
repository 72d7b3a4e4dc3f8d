"""SIGKILL at the moments that write or delete folders: during pair generation, while an old checkpoint
is being deleted, and during the final save. The same command run again cleans up what the kill left
and ends with the weights and pairs of a run that was never interrupted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mmalign
from mmalign.cli import main
from mmalign.config import load_config
from tests.conftest import tiny_run_overrides

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "image" / "diffusion_dpo.yaml"

#: Run the CLI in a child that SIGKILLs itself at one moment (argv[1]), the rest of argv being the CLI's.
KILLED_AT = r"""
import os, shutil, signal, sys
from pathlib import Path

from PIL import Image

def die():
    os.kill(os.getpid(), signal.SIGKILL)

moment = sys.argv[1]
if moment == "pairs":  # the third candidate image written into the half-built pair folder
    real_save, written = Image.Image.save, []
    def save(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)
        if "/.tmp-" in str(fp):
            written.append(fp)
            if len(written) == 3:
                die()
    Image.Image.save = save
elif moment == "prune":  # one file of the old checkpoint deleted, the rest not yet
    real_rmtree = shutil.rmtree
    def rmtree(path, *args, **kwargs):
        if Path(path).name.startswith(".tmp-delete-"):
            next(p for p in Path(path).iterdir() if p.is_file()).unlink()
            die()
        return real_rmtree(path, *args, **kwargs)
    shutil.rmtree = rmtree
elif moment == "final":  # the final folder written, not yet renamed into place
    real_replace = os.replace
    def replace(src, dst, *args, **kwargs):
        if Path(src).name.startswith(".tmp-final-"):
            die()
        return real_replace(src, dst, *args, **kwargs)
    os.replace = replace

elif moment == "rollout":  # inside the third rollout's sampling loop
    from mmalign.models.diffusion import DiffusionModel
    real_trajectory, real_prediction, calls = DiffusionModel.sample_trajectory, DiffusionModel.guided_prediction, []
    def sample_trajectory(self, *args, **kwargs):
        calls.append("rollout")
        return real_trajectory(self, *args, **kwargs)
    def guided_prediction(self, *args, **kwargs):
        if calls.count("rollout") == 3:
            calls.append("prediction")
            if calls.count("prediction") == 2:
                die()
        return real_prediction(self, *args, **kwargs)
    DiffusionModel.sample_trajectory, DiffusionModel.guided_prediction = sample_trajectory, guided_prediction
elif moment == "update":  # inside this process's first optimizer step, before it writes the weights
    import torch
    def step(self, *args, **kwargs):
        die()
    torch.optim.AdamW.step = step

from mmalign.cli import main
sys.exit(main(sys.argv[2:]))
"""


def leftovers(*roots: Path) -> list[str]:
    return sorted(p.name for root in roots for p in root.rglob(".*") if p.name.startswith((".tmp-", ".old-")))


def run_killed_at(moment: str, args: list[str]) -> None:
    done = subprocess.run([sys.executable, "-c", KILLED_AT, moment, *args], capture_output=True, text=True)
    assert done.returncode == -9, f"the run was not killed at {moment}: {done.stderr[-2000:]}"


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
    run_killed_at("pairs", args)
    assert [p.name for p in (cache / "shapes-prefs").iterdir() if not p.name.endswith(".lock")][0].startswith(".tmp-")
    assert not list((cache / "shapes-prefs").glob("*/pairs.jsonl"))  # nothing looks complete

    run_killed_at("prune", args)  # the pairs are built again; the kill comes while step 2 is deleted
    assert leftovers(cache) == []
    checkpoints = killed / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".tmp-delete-step-000002", "step-000004"]

    run_killed_at("final", args)
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
    run_killed_at("rollout", args("killed"))  # during step 3's rollout, after the step-2 checkpoint
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-000002"]
    run_killed_at("update", args("killed"))  # resumed at step 2, killed inside step 3's optimizer step
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-000002"]
    assert main(args("killed")) == 0
    a = load_file(str(tmp_path / "straight" / "final" / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(killed / "final" / "lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
