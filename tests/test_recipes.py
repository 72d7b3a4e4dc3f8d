"""Every recipe in configs/ end to end from the CLI on the embedded default, checking a real effect.

The recipes share the embedded preference pairs: they are generated once into the session's cache
(as the first recipe run would), then both recipes train side by side, one CPU thread each.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GAIN = 0.02  # held-out gold-metric gain every recipe must show (measured gains: see the closing notes)


def _launch(recipe: str, out: Path, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "mmalign.cli", "train", str(ROOT / "configs" / recipe), f"output_dir={out}",
           *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f"{out.name}.log", "w") as log:  # a file, not a pipe: nobody reads while both run
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def _report(process: subprocess.Popen, out: Path) -> dict:
    process.wait(timeout=1800)
    assert process.returncode == 0, (out.parent / f"{out.name}.log").read_text()[-4000:]
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def recipe_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, dict]]:
    """Run the shipped recipes as a user does (fewer intermediate evaluations): {name: (dir, report)}."""
    from mmalign.config import load_config
    from mmalign.data.sources import resolve_pairs_path
    from mmalign.models.diffusion import DiffusionModel
    from mmalign.registry import resolve_model_path

    root = tmp_path_factory.mktemp("recipes")
    run = load_config(ROOT / "configs/image/diffusion_dpo.yaml", [])
    model = DiffusionModel.from_pretrained(
        run.model.path, lora_rank=run.model.lora_rank, lora_targets=tuple(run.model.lora_targets)
    )
    resolve_pairs_path(run.data, model, resolve_model_path(run.model.path))  # the shared pairs, in the cache
    del model
    dpo = _launch("image/diffusion_dpo.yaml", root / "dpo", "eval.every=0")
    smpo = _launch("image/smpo.yaml", root / "smpo", "eval.every=0")
    return {"dpo": (root / "dpo", _report(dpo, root / "dpo")), "smpo": (root / "smpo", _report(smpo, root / "smpo"))}


@pytest.mark.slow
def test_diffusion_dpo_recipe_raises_the_heldout_gold_metric(recipe_runs):
    out, report = recipe_runs["dpo"]
    assert report["recipe"] == "image/diffusion_dpo" and report["gold_metric"] == "shapes-gold"
    assert report["eval_prompts"] == "heldout" and report["steps"] == 300
    assert report["after"] > report["before"] + GAIN, report
    # the proxy that labelled the pairs moves the same way; the pictures are checked by the gold metric
    assert report["metrics"]["after"]["clip-score"] > report["metrics"]["before"]["clip-score"]
    for name in ("samples/before_after.png", "final/lora/pytorch_lora_weights.safetensors", "report.md"):
        assert (out / name).exists(), name


@pytest.mark.slow
def test_smpo_recipe_raises_the_heldout_gold_metric(recipe_runs):
    out, report = recipe_runs["smpo"]
    assert report["recipe"] == "image/smpo" and report["method"] == "smpo"
    assert report["after"] > report["before"] + GAIN, report
    assert 0 < report["train"]["pair_scale"] <= 10 * (2 * (1 / (1 + math.exp(-1))) - 1) + 1e-6  # γ(2p−1), p ≤ σ(1)
    assert (out / "samples/before_after.png").exists()
