"""Two CPU processes under FSDP2 (`accelerate launch --config_file configs/accelerate/fsdp.yaml`, gloo) train
like one process on the same global batch, write the files one process writes, and resume from a
checkpoint to the weights and optimizer state of the run that was not interrupted, bit for bit. Two
launches in all (they are slow): the uninterrupted run, and a resume of its step-2 checkpoint. (A kill
inside a step leaves the last complete checkpoint, as `tests/test_kills.py` checks on one process.)"""

from __future__ import annotations

import pytest

from tests.sharded_runs import ShardedRuns, differences_after_resume, differences_from_one_process, sharded_runs


@pytest.fixture(scope="module")
def fsdp_runs(tiny_pipelines, tmp_path_factory) -> ShardedRuns:
    return sharded_runs("fsdp.yaml", tiny_pipelines["sd"], tmp_path_factory.mktemp("fsdp"), [], 29531)


@pytest.mark.slow
def test_fsdp_two_processes_match_one_and_write_the_same_files(fsdp_runs, tiny_pipelines):
    assert differences_from_one_process(fsdp_runs, tiny_pipelines["sd"]) == []


@pytest.mark.slow
def test_fsdp_resume_ends_bit_for_bit_where_the_uninterrupted_run_ends(fsdp_runs):
    assert differences_after_resume(fsdp_runs) == []
