"""The shared trainer: exact resume after SIGKILL, run directories, refusing a changed config, failures."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mmalign
from mmalign.cli import main as cli_main
from mmalign.config import load_config
from mmalign.train.checkpoint import CheckpointError, checkpoint_dirs
from mmalign.train.rundir import ConfigMismatchError
from tests.cli_child import start_cli
from tests.conftest import tiny_run_overrides

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "image" / "diffusion_dpo.yaml"


@pytest.mark.slow
def test_resume_after_sigkill_ends_bit_identical(tiny_pipelines, pair_folder, tmp_path):
    common = ["train.gradient_accumulation_steps=2", "train.learning_rate=1e-3", "eval.num_prompts=2"]
    steps = 4
    straight = tmp_path / "straight"  # in-process: the same code path the CLI takes, without an interpreter start
    mmalign.train(load_config(RECIPE, tiny_run_overrides(tiny_pipelines["sd"], pair_folder, straight, steps) + common))

    killed = tmp_path / "killed"
    args = ["train", str(RECIPE), *tiny_run_overrides(tiny_pipelines["sd"], pair_folder, killed, steps), *common]
    child = start_cli(args, tmp_path / "killed.log")
    deadline = time.time() + 300
    while not (killed / "checkpoints" / "step-000002").exists():
        assert child.is_alive(), "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.02)
    child.kill()
    child.join()
    assert not (killed / "report.json").exists()
    interrupted_at = int(checkpoint_dirs(killed / "checkpoints")[-1].name.split("-")[1])
    assert interrupted_at < steps

    # the same command resumes (in this process: the CLI's code path without a second interpreter start)
    assert cli_main(args) == 0
    a = load_file(str(straight / "final" / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(killed / "final" / "lora" / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    opt_a = load_file(str(straight / "checkpoints" / f"step-{steps:06d}" / "optimizer.safetensors"))
    opt_b = load_file(str(killed / "checkpoints" / f"step-{steps:06d}" / "optimizer.safetensors"))
    assert all(torch.equal(opt_a[k], opt_b[k]) for k in opt_a)
    log_a = json.loads((straight / "report.json").read_text())["train"]
    log_b = json.loads((killed / "report.json").read_text())["train"]
    assert log_a["loss"] == pytest.approx(log_b["loss"], abs=0)


def test_run_directory_and_report(tiny_pipelines, pair_folder, tmp_path):
    out = tmp_path / "run"
    report = mmalign.train(load_config(RECIPE, tiny_run_overrides(tiny_pipelines["sd"], pair_folder, out, 4)))
    for name in (
        "config.yaml",
        "report.md",
        "report.json",
        "evaluations.json",
        "samples/step-000000.png",
        "samples/step-000004.png",
        "samples/before_after.png",
        "final/lora/pytorch_lora_weights.safetensors",
    ):
        assert (out / name).exists(), name
    assert any((out / "logs").iterdir())
    assert [p.name for p in checkpoint_dirs(out / "checkpoints")] == ["step-000002", "step-000004"]
    saved = json.loads((out / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert {"recipe", "steps", "gold_metric", "before", "after"} <= set(saved)
    assert saved["steps"] == 4 and saved["gold_metric"] == "shapes-gold"
    assert "Gold metric `shapes-gold`" in (out / "report.md").read_text()

    # the same command on a finished run resumes at the end and rewrites the same report
    again = mmalign.train(load_config(RECIPE, tiny_run_overrides(tiny_pipelines["sd"], pair_folder, out, 4)))
    assert again["after"] == report["after"]

    with pytest.raises(ConfigMismatchError, match="different config"):
        mmalign.train(
            load_config(
                RECIPE, tiny_run_overrides(tiny_pipelines["sd"], pair_folder, out, 4) + ["train.learning_rate=0.5"]
            )
        )


def test_failed_run_leaves_no_report_or_final(tiny_pipelines, pair_folder, tmp_path, capsys):
    bad = tmp_path / "bad-pairs"
    bad.mkdir()
    (bad / "pairs.jsonl").write_text('{"image_0": "a.png"}\n')
    out = tmp_path / "run"
    assert cli_main(["train", str(RECIPE), *tiny_run_overrides(tiny_pipelines["sd"], bad, out, 2)]) == 2
    assert "row 1, field 'image_1': missing field" in capsys.readouterr().err
    assert not (out / "report.json").exists() and not (out / "final").exists()
    # the corrected command starts over in the same directory: nothing but the config was written
    assert cli_main(["train", str(RECIPE), *tiny_run_overrides(tiny_pipelines["sd"], pair_folder, out, 2)]) == 0
    assert (out / "report.json").exists()


def test_non_finite_loss_stops_the_run(tiny_pipelines, pair_folder, tmp_path):
    overrides = tiny_run_overrides(tiny_pipelines["sd"], pair_folder, tmp_path / "run", 2)
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        mmalign.train(load_config(RECIPE, [*overrides, "diffusion_dpo.beta=inf"]))
    assert not (tmp_path / "run" / "final").exists()


def test_gradient_accumulation_matches_the_larger_batch(tiny_pipelines, pair_folder, tmp_path):
    common = ["train.checkpoint_every=0", "train.learning_rate=1e-3", "eval.num_prompts=1"]
    big = tiny_run_overrides(tiny_pipelines["sd"], pair_folder, tmp_path / "big", 3) + common
    small = tiny_run_overrides(tiny_pipelines["sd"], pair_folder, tmp_path / "small", 3) + common
    mmalign.train(load_config(RECIPE, [*big, "train.batch_size=8"]))
    mmalign.train(load_config(RECIPE, [*small, "train.batch_size=4", "train.gradient_accumulation_steps=2"]))
    a = load_file(str(tmp_path / "big" / "final" / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "small" / "final" / "lora" / "pytorch_lora_weights.safetensors"))
    # Adam turns float-rounding differences of the two summation orders into ~1e-5 updates; the
    # training signal itself moves weights by ~lr · steps = 3e-3
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a)
    assert not all(torch.equal(a[k], torch.zeros_like(a[k])) for k in a if "lora_B" in k or "lora.up" in k)


def test_bf16_mixed_precision_runs_on_cpu(tiny_pipelines, pair_folder, tmp_path):
    overrides = tiny_run_overrides(tiny_pipelines["sd"], pair_folder, tmp_path / "bf16", 2)
    report = mmalign.train(load_config(RECIPE, [*overrides, "train.mixed_precision=bf16", "eval.num_prompts=1"]))
    assert report["steps"] == 2 and torch.isfinite(torch.tensor(report["train"]["loss"]))


def test_damaged_checkpoints_are_passed_over_and_moved_ones_refused(tiny_pipelines, pair_folder, tmp_path, capsys):
    overrides = tiny_run_overrides(tiny_pipelines["sd"], pair_folder, tmp_path / "straight", 4)
    mmalign.train(load_config(RECIPE, overrides))
    expected = load_file(str(tmp_path / "straight" / "checkpoints" / "step-000004" / "trainable.safetensors"))
    for damage in ("trainable.safetensors", "trainer_state.json"):
        out = tmp_path / damage
        run = load_config(RECIPE, tiny_run_overrides(tiny_pipelines["sd"], pair_folder, out, 4))
        mmalign.train(run)
        newest = out / "checkpoints" / "step-000004"
        (newest / damage).write_bytes((newest / damage).read_bytes()[:40])  # truncated by a full disk, say
        (out / "final").rename(out / ".tmp-final-leftover")  # a kill during the final save
        (out / "report.json").unlink()
        mmalign.train(run)
        assert "step-000004 is damaged" in capsys.readouterr().out  # said, then resumed from step 2
        resumed = load_file(str(newest / "trainable.safetensors"))
        assert resumed.keys() == expected.keys() and all(torch.equal(resumed[k], expected[k]) for k in expected)
        assert not (out / ".tmp-final-leftover").exists() and (out / "final").is_dir()
    moved = tmp_path / "trainable.safetensors"
    (moved / "checkpoints" / "step-000004").rename(moved / "checkpoints" / "step-000006")
    with pytest.raises(CheckpointError, match="records step 4, not the folder's"):
        mmalign.train(load_config(RECIPE, tiny_run_overrides(tiny_pipelines["sd"], pair_folder, moved, 4)))


def test_pruning_never_leaves_a_partial_checkpoint(tmp_path):
    from mmalign.train.checkpoint import prune, remove_partial

    for step in (2, 4, 6):
        folder = tmp_path / f"step-{step:06d}"
        folder.mkdir()
        (folder / "trainer_state.json").write_text("{}")
    prune(tmp_path, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000006"]
    (tmp_path / ".tmp-delete-step-000004").mkdir()  # a kill during the deletion of an old checkpoint
    remove_partial(tmp_path)
    assert [p.name for p in checkpoint_dirs(tmp_path)] == ["step-000006"] and len(list(tmp_path.iterdir())) == 1
