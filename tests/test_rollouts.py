"""The online batch schedule: which prompts each step rolls out, on how many processes, reused for μ steps."""

from __future__ import annotations

import pytest

from mmalign.config import ConfigError, TrainConfig
from mmalign.train.rollouts import RolloutSchedule, RolloutSource


def test_processes_split_exactly_the_prompts_one_process_would_use():
    one = RolloutSchedule(batch_size=4, accumulation=2, iterations=1)
    two = [RolloutSchedule(4, 2, 1, num_processes=2, process_index=p) for p in (0, 1)]
    for step in range(3):
        for micro in range(2):
            alone = list(one.prompt_indices(step, micro))
            assert alone == [i for s in two for i in s.prompt_indices(step, micro)]
    # consecutive rollouts walk the stream without gaps or repeats
    seen = [i for step in range(3) for micro in range(2) for i in one.prompt_indices(step, micro)]
    assert seen == list(range(24))


def test_a_rollout_serves_its_iterations_and_then_a_new_one_is_made():
    made = []

    def rollout(prompts):
        made.append(prompts)
        return list(prompts)

    source = RolloutSource(RolloutSchedule(2, 1, iterations=3), lambda i: f"p{i}", rollout)
    batches = [source.batch(step, 0) for step in range(6)]
    assert batches[0] is batches[1] is batches[2] and batches[3] is batches[4] is batches[5]
    assert made == [["p0", "p1"], ["p2", "p3"]]
    # a resumed run (a fresh source) starting at step 4 rolls out what the uninterrupted run used there
    resumed = RolloutSource(RolloutSchedule(2, 1, iterations=3), lambda i: f"p{i}", rollout)
    assert resumed.batch(4, 0) == batches[4]


def test_checkpoints_that_cut_a_rollout_are_refused():
    with pytest.raises(ConfigError, match="checkpoint_every=5 must be a multiple of grpo.iterations=2"):
        RolloutSchedule.of_run(TrainConfig(checkpoint_every=5), 2, 1, 0, "grpo")
    with pytest.raises(ConfigError, match="grpo.iterations must be at least 1"):
        RolloutSchedule.of_run(TrainConfig(), 0, 1, 0, "grpo")
    assert RolloutSchedule.of_run(TrainConfig(checkpoint_every=4, batch_size=8), 2, 2, 1, "grpo").batch_size == 8
