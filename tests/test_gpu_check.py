"""benchmarks/gpu_check.py on shrunk configs: the JSON it writes, a failing family recorded while the others
finish, and the real configs' parameter counts (built on the meta device)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from mmalign.models import real_configs

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("benchmarks_gpu_check", ROOT / "benchmarks/gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


@pytest.mark.slow
def test_tiny_run_writes_the_report_and_records_a_failing_family(gpu_check, monkeypatch, tmp_path):
    broken = gpu_check.Family("no-such-model", ("dpo-lora",), 10)
    monkeypatch.setitem(gpu_check.FAMILIES, "broken", broken)
    out = tmp_path / "report.json"
    argv = ["--tiny", "--families", "broken,sd15", "--recipes", "dpo-lora,sft-lora", "--steps", "1", "--out", str(out),
            "model.offload_frozen=true"]  # fmt: skip
    returned = gpu_check.main(argv)
    report = json.loads(out.read_text())
    assert report == returned and not list(tmp_path.glob(".*.tmp"))
    assert {"device", "tiny", "dtype", "steps", "overrides", "families", "total_s", "ok"} <= report.keys()
    assert report["overrides"] == ["model.offload_frozen=true"]
    assert report["tiny"] is True and report["ok"] is False and list(report["families"]) == ["broken", "sd15"]
    failed = report["families"]["broken"]
    assert failed["ok"] is False and "unknown model 'no-such-model'" in failed["error"]
    sd15 = report["families"]["sd15"]
    assert sd15["ok"] is True and sd15["model"] == real_configs.REAL_MODELS["sd15"] and "error" not in sd15
    assert list(sd15["recipes"]) == ["dpo-lora", "sft-lora"]
    for recipe in sd15["recipes"].values():
        assert recipe["steps"] == 1 and recipe["step_s"] > 0 and recipe["images_per_s"] > 0
        assert recipe["peak_mib"] > 0 and recipe["trainable_params"] > 0
        assert recipe["step_s_spread"][0] <= recipe["step_s"] <= recipe["step_s_spread"][1]
    ratio = sd15["recipes"]["dpo-lora"]["step_s"] / sd15["recipes"]["sft-lora"]["step_s"]
    assert sd15["dpo_sft_step_ratio"] == pytest.approx(ratio, abs=1e-3)


def test_unknown_family_is_named(gpu_check):
    with pytest.raises(SystemExit, match="unknown family 'sd9'"):
        gpu_check.main(["--tiny", "--families", "sd9"])


@pytest.mark.parametrize(("config", "published"), [("SD15_UNET", 859_520_964), ("SDXL_UNET", 2_567_463_684)])
def test_real_unet_configs_have_the_published_parameter_counts(config, published):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**getattr(real_configs, config))
    assert sum(p.numel() for p in unet.parameters()) == published
