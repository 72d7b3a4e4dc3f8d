"""Every recipe in configs/ end to end from the CLI on the embedded default, checking a real effect."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GAIN = 0.02  # held-out gold-metric gain every recipe must show (measured gains: see the closing notes)


def _train(recipe: str, out: Path, *overrides: str) -> dict:
    cmd = [sys.executable, "-m", "mmalign.cli", "train", str(ROOT / "configs" / recipe), f"output_dir={out}",
           *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads((out / "report.json").read_text())


@pytest.mark.slow
def test_diffusion_dpo_recipe_raises_the_heldout_gold_metric(tmp_path):
    """The shipped recipe as a user runs it, with fewer intermediate evaluations."""
    out = tmp_path / "dpo"
    report = _train("image/diffusion_dpo.yaml", out, "eval.every=0")
    assert report["recipe"] == "image/diffusion_dpo" and report["gold_metric"] == "shapes-gold"
    assert report["eval_prompts"] == "heldout" and report["steps"] == 300
    assert report["after"] > report["before"] + GAIN, report
    # the proxy that labelled the pairs moves the same way; the pictures are checked by the gold metric
    assert report["metrics"]["after"]["clip-score"] > report["metrics"]["before"]["clip-score"]
    for name in ("samples/before_after.png", "final/lora/pytorch_lora_weights.safetensors", "report.md"):
        assert (out / name).exists(), name


@pytest.mark.slow
def test_smpo_recipe_raises_the_heldout_gold_metric(tmp_path):
    out = tmp_path / "smpo"
    report = _train("image/smpo.yaml", out, "eval.every=0")
    assert report["recipe"] == "image/smpo" and report["method"] == "smpo"
    assert report["after"] > report["before"] + GAIN, report
    assert 0 < report["train"]["pair_scale"] <= 10 * (2 * (1 / (1 + math.exp(-1))) - 1) + 1e-6  # γ(2p−1), p ≤ σ(1)
    assert (out / "samples/before_after.png").exists()

