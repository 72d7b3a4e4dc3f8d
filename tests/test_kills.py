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
