"""GRPO on a VLM: verifiable rewards, the world's questions, the method on the shared trainer."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import mmalign
from mmalign.config import ConfigError, load_config
from mmalign.losses import group_advantages, grpo_loss
from mmalign.models.tiny_vlm import build_tiny_vlm
from mmalign.models.vlm import VisionLanguageModel
from mmalign.vlm import world
from mmalign.vlm.grpo import GRPO
from mmalign.vlm.rewards import (
    RewardTerm,
    accuracy_reward,
    extract_answer,
    format_reward,
    parse_response,
    weighted_rewards,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>count</think><answer>2</answer>", ("count", "2")),
        ("  <think>a\nb</think>\n<answer> yes </answer>\n", ("a\nb", "yes")),
        ("<think>count<answer>2</answer>", None),  # missing </think>
        ("<think>x</think><answer>1</answer><answer>2</answer>", None),  # two answer blocks
        ("<think>x</think><answer>1</answer> because", None),  # text after </answer>
        ("<think></think><answer>1</answer>", None),  # empty thinking
        ("<think>x<think>y</think></think><answer>1</answer>", None),  # nested
        ("<answer>1</answer>", None),
        ("", None),
    ],
)
def test_response_format_table(text, expected):
    assert parse_response(text) == expected
    assert format_reward([text], ["?"]) == [float(expected is not None)]


def test_accuracy_reads_the_last_answer_block_even_when_the_format_is_wrong():
    completions = ["<think>x</think><answer>Red.</answer>", "<answer>red</answer>", "red", "<answer>blue</answer>"]
    assert accuracy_reward(completions, ["red"] * 4) == [1.0, 1.0, 0.0, 0.0]
    assert extract_answer("<answer>1</answer> <answer> 2 </answer>") == "2"
    total, parts = weighted_rewards([RewardTerm("accuracy", 0.9), RewardTerm("format", 0.1)], completions, ["red"] * 4)
    torch.testing.assert_close(total, torch.tensor([1.0, 0.9, 0.0, 0.0]))
    assert set(parts) == {"accuracy", "format"}
    with pytest.raises(ValueError, match="unknown reward function 'speed'"):
        weighted_rewards([RewardTerm("speed", 1.0)], completions, ["red"] * 4)


def test_world_is_deterministic_balanced_and_splits_vision_from_text():
    a, b = world.question("count", 3, 5), world.question("count", 3, 5)
    assert a.text == b.text and a.answer == b.answer and np.array_equal(a.images[0], b.images[0])
    questions = world.question_set(list(world.KINDS), 24)
    assert len(questions) == 24 * len(world.KINDS)
    for kind in world.KINDS:
        answers = {q.answer for q in questions if q.kind == kind}
        assert len(answers) >= 2, kind  # no constant answer a blind model could learn
    match = next(q for q in questions if q.kind == "match")
    assert len(match.images) == 2 and match.answer in ("1", "2")
    assert {q.vision for q in questions} == {True, False}
    blind = match.conversation(blind=True)
    assert all(np.asarray(im).max() == 0 for im in blind.images)
    assert all(im.size == (world.IMAGE_SIZE, world.IMAGE_SIZE) for im in blind.images)
    assert parse_response(match.reference_response()) == (match.thinking, match.answer)
    assert match.answer not in match.thinking.split()
    with pytest.raises(ValueError, match="held-out"):
        world.mixed_stream(["count"], world.HELDOUT_SEED, 0)
    # counting answers follow what is drawn: a blank-coloured count of 0 has no such colour in the image
    q = next(q for q in questions if q.kind == "count" and q.answer == "0")
    colour = q.text.split()[2]
    rgb = np.array(world.COLOURS[colour])
    assert not (np.abs(q.images[0].astype(int) - rgb).sum(-1) < 10).any()


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory) -> Path:
    return build_tiny_vlm("qwen2-vl", tmp_path_factory.mktemp("policy") / "qwen2-vl", corpus=world.corpus())


def test_one_step_raises_the_rewarded_tokens_probability(tiny_policy):
    torch.manual_seed(0)
    vlm = VisionLanguageModel.from_pretrained(tiny_policy)
    questions = world.question_set(["count", "arith"], 2, seed=1000)
    rollout = vlm.sample([q.conversation() for q in questions], 8, max_new_tokens=4, temperature=1.5)
    first = rollout.completion_ids[:, 0]
    target = int(first.mode().values)  # reward: "the completion starts with this token"
    rewards = (first == target).float()
    adv = group_advantages(rewards, 8)
    args = (rollout.prompts, rollout.completion_ids, rollout.completion_mask)
    before = vlm.token_logprobs(*args)[0].detach()
    optimizer = torch.optim.SGD([p for p in vlm.model.parameters() if p.requires_grad], lr=0.5)
    logp, _ = vlm.token_logprobs(*args)
    loss, metrics = grpo_loss(logp, logp.detach(), adv, rollout.completion_mask)
    assert metrics["ratio_mean"].item() == 1.0
    loss.backward()
    optimizer.step()
    after = vlm.token_logprobs(*args)[0].detach()
    rewarded = (adv > 0) & (first == target)
    assert rewarded.any()
    assert (after[rewarded, 0] > before[rewarded, 0]).all()


def _grpo_overrides(policy: Path, out: Path, steps: int, *extra: str) -> list[str]:
    return [
        f"model.path={policy}",
        f"output_dir={out}",
        f"train.max_steps={steps}",
        "train.batch_size=2",
        "train.checkpoint_every=2",
        "train.log_every=1",
        "train.learning_rate=1e-3",
        "eval.every=0",
        "grpo.num_generations=4",
        "grpo.max_new_tokens=6",
        "data.embedded.eval_per_kind=3",
        "data.embedded.eval_kinds=[count,arith]",
        *extra,
    ]


def test_grpo_runs_on_the_trainer_resumes_exactly_and_reports_blind_accuracy(tiny_policy, tmp_path):
    recipe = ROOT / "configs/vlm/grpo.yaml"
    straight = mmalign.train(load_config(recipe, _grpo_overrides(tiny_policy, tmp_path / "a", 4)))
    assert straight["gold_metric"] == "heldout_accuracy"
    after = straight["metrics"]["after"]
    for key in ("accuracy/count", "blind_accuracy/count", "accuracy/text", "blind_accuracy/vision", "format_rate"):
        assert 0.0 <= after[key] <= 1.0, key
    log = straight["train"]
    assert {"reward", "frac_reward_zero_std", "entropy", "clip_high_frac", "completion_length"} <= set(log)
    model_dir = tmp_path / "a" / "final" / "model"
    assert (model_dir / "model.safetensors").is_file()
    VisionLanguageModel.from_pretrained(model_dir)  # the saved policy loads like any checkpoint

    # the same run with its last checkpoint, report and result removed resumes from step 2 and ends identical
    b = tmp_path / "b"
    mmalign.train(load_config(recipe, _grpo_overrides(tiny_policy, b, 4)))
    shutil.rmtree(b / "checkpoints" / "step-000004")
    shutil.rmtree(b / "final")
    mmalign.train(load_config(recipe, _grpo_overrides(tiny_policy, b, 4)))
    first = load_file(str(tmp_path / "a" / "checkpoints" / "step-000004" / "trainable.safetensors"))
    resumed = load_file(str(b / "checkpoints" / "step-000004" / "trainable.safetensors"))
    assert first.keys() == resumed.keys() and all(torch.equal(first[k], resumed[k]) for k in first)


def test_ratio_is_exactly_one_at_the_first_inner_step_and_moves_after(tiny_policy, tmp_path):
    run = load_config(
        ROOT / "configs/vlm/grpo.yaml", _grpo_overrides(tiny_policy, tmp_path / "mu", 2, "grpo.iterations=2")
    )
    method = GRPO(run)
    accelerator = type("Acc", (), {"device": torch.device("cpu"), "num_processes": 1, "process_index": 0})()
    method.setup(accelerator)
    optimizer = torch.optim.SGD([p for p in method.trainable_module().parameters() if p.requires_grad], lr=1e-2)
    batch = method.next_batch(0, 0)
    # a random policy earns no reward (all groups tie); give the rollout advantages so the step moves it
    batch.advantages = torch.linspace(-1, 1, len(batch.advantages))
    loss, metrics = method.compute_loss(batch, 0, 0)
    assert metrics["ratio_mean"].item() == 1.0
    loss.backward()
    optimizer.step()
    assert method.next_batch(1, 0) is batch  # μ = 2: the same rollout for the second step
    _, metrics = method.compute_loss(batch, 1, 0)
    assert metrics["ratio_mean"].item() != 1.0
    assert method.next_batch(2, 0) is not batch
    with pytest.raises(ConfigError, match="multiple of grpo.iterations"):
        GRPO(
            load_config(
                ROOT / "configs/vlm/grpo.yaml", _grpo_overrides(tiny_policy, tmp_path / "bad", 2, "grpo.iterations=3")
            )
        ).setup(accelerator)


def test_the_shipped_warm_start_reads_the_image():
    """embedded:vlm-shapes answers `largest` and `match` from the image: far better than with black images."""
    from mmalign.models.vlm import VisionLanguageModel
    from mmalign.registry import resolve_model_path
    from mmalign.vlm.rewards import accuracy_reward

    vlm = VisionLanguageModel.from_pretrained(resolve_model_path("embedded:vlm-shapes"))

    def accuracy(kind: str, blind: bool) -> float:
        questions = world.question_set([kind], 40)
        prompts = vlm.encode([q.conversation(blind=blind) for q in questions])
        ids, mask = vlm.generate(prompts, max_new_tokens=24, do_sample=False)
        return float(np.mean(accuracy_reward(vlm.decode(ids, mask), [q.answer for q in questions])))

    for kind, margin in (("largest", 0.25), ("match", 0.1)):
        real, blind = accuracy(kind, False), accuracy(kind, True)
        assert real > blind + margin, (kind, real, blind)
