"""Checkpoint parts: pickle-free state round trips, RNG restore, atomic folders, pruning."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mmalign.io import atomic_directory
from mmalign.train import checkpoint as ckpt
from mmalign.train.trainer import EpochSampler


def test_optimizer_state_round_trips_without_pickle(tmp_path):
    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.8, 0.95))
    for _ in range(3):
        sum(p.pow(2).sum() for p in params).backward()
        opt.step()
        opt.zero_grad()
    ckpt.save_state(tmp_path, "optimizer", ckpt.optimizer_state(opt))
    assert not list(tmp_path.glob("*.pt")) and not list(tmp_path.glob("*.pkl"))
    fresh = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=1.0)
    ckpt.restore_optimizer(fresh, ckpt.load_state(tmp_path, "optimizer"))
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == b["param_groups"]
    for i in a["state"]:
        for key, value in a["state"][i].items():
            assert torch.equal(value, b["state"][i][key])


def test_rng_state_restores_every_generator(tmp_path):
    ckpt.save_state(tmp_path, "rng", ckpt.rng_state())
    expected = (torch.rand(3), np.random.rand(3), random.random())
    ckpt.restore_rng(ckpt.load_state(tmp_path, "rng"))
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1])
    assert random.random() == expected[2]


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        (tmp / "half.txt").write_text("partial")
        raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_directory(target) as tmp:
        (tmp / "done.txt").write_text("complete")
    with pytest.raises(RuntimeError), atomic_directory(target) as tmp:
        raise RuntimeError("a failed rewrite keeps the old result")
    assert (target / "done.txt").read_text() == "complete"


def test_only_complete_checkpoints_count_and_pruning_keeps_the_newest(tmp_path):
    for step in (2, 4, 6):
        (tmp_path / f"step-{step:06d}").mkdir()
        (tmp_path / f"step-{step:06d}" / "trainer_state.json").write_text("{}")
    (tmp_path / "step-000008").mkdir()  # no trainer_state.json: never finished
    (tmp_path / ".tmp-step-000010").mkdir()
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step-000002", "step-000004", "step-000006"]
    ckpt.remove_partial(tmp_path)
    assert not (tmp_path / ".tmp-step-000010").exists()
    ckpt.prune(tmp_path, keep=2)
    assert [p.name for p in ckpt.checkpoint_dirs(tmp_path)] == ["step-000004", "step-000006"]


def test_epoch_sampler_resumes_mid_epoch():
    full = list(EpochSampler(10, seed=3, epoch=2))
    assert sorted(full) == list(range(10))
    assert list(EpochSampler(10, seed=3, epoch=2, start=4)) == full[4:]
    assert list(EpochSampler(10, seed=3, epoch=3)) != full
