"""Two CPU processes under DeepSpeed ZeRO-2 (`accelerate launch --config_file configs/accelerate/zero2.yaml`,
gloo) train like one process on the same global batch, write the files one process writes, and resume
from a checkpoint to the same weights and optimizer state, bit for bit, as the run that was not
interrupted. Two launches in all (they are slow): the uninterrupted run, and a resume of its step-2
checkpoint. The DeepSpeed setups the trainer refuses are checked without a launch."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from accelerate.utils import DistributedType

from mmalign.config import ConfigError, TrainConfig
from mmalign.train import sharding
from tests.sharded_runs import ShardedRuns, differences_after_resume, differences_from_one_process, sharded_runs

pytest.importorskip("deepspeed")


@pytest.fixture(scope="module")
def zero_runs(tiny_pipelines, tmp_path_factory) -> ShardedRuns:
    """Gradients clipped, so that DeepSpeed's clipping is compared with the trainer's."""
    root = tmp_path_factory.mktemp("zero2")
    return sharded_runs("zero2.yaml", tiny_pipelines["sd"], root, ["train.max_grad_norm=0.05"], 29541)


@pytest.mark.slow
def test_zero2_two_processes_match_one_and_write_the_same_files(zero_runs, tiny_pipelines):
    assert differences_from_one_process(zero_runs, tiny_pipelines["sd"], logged=("loss", "grad_norm")) == []


@pytest.mark.slow
def test_zero2_resume_ends_bit_for_bit_where_the_uninterrupted_run_ends(zero_runs):
    assert differences_after_resume(zero_runs) == []


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
