"""Listener-shaped GRPO: answer stripping, the listener's decision probabilities, the shaped reward."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
import torch

import mmalign
from mmalign.config import load_config
from mmalign.losses import group_advantages
from mmalign.models.tiny_vlm import build_tiny_vlm
from mmalign.models.vlm import VisionLanguageModel
from mmalign.vlm import world
from mmalign.vlm.listener import Listener, ListenerGRPO, listener_view
from mmalign.vlm.rewards import weighted_rewards

ROOT = Path(__file__).resolve().parents[1]
TAGS = ("<think>", "</think>", "<answer>", "</answer>")


@pytest.mark.parametrize(
    ("response", "view"),
    [
        ("<think>image 1: a red circle</think><answer>1</answer>", "image 1: a red circle"),
        ("<think>so <answer>1</answer></think><answer>1</answer>", None),  # an answer hidden in the thinking
        ("<think>a</think>the answer is 1<answer>1</answer>", None),  # text between the blocks
        ("<think>a</think><answer>1</answer>2", None),  # text after the answer
        ("<think>a<answer>1</answer>", None),  # thinking never closed
        ("<answer>1</answer><think>a</think>", None),  # wrong order
        ("<think>a</think><answer>1</answer><think>b</think>", None),
        ("<think>a</think></think><answer>1</answer>", None),
        ("<think><think>a</think><answer>1</answer>", None),
    ],
)
def test_listener_view_table(response, view):
    assert listener_view(response) == view


def test_listener_view_never_leaks_an_answer_whatever_the_response():
    rng = random.Random(0)
    pieces = [*TAGS, "1", "2", "image 1 ", "answer", "<", ">", "/", " ", "think", "\n"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
        view = listener_view(text)
        if view is not None:
            assert not any(tag in view for tag in TAGS), text
            assert text.index("</think>") > text.index(view)  # the view precedes the end of the thinking
    for order in itertools.permutations(TAGS):  # every ordering of the four tags around fixed text
        view = listener_view("x".join(order) + "x")
        assert view is None or not any(tag in view for tag in TAGS)


@pytest.fixture(scope="module")
def tiny_listener(tmp_path_factory) -> Path:
    return build_tiny_vlm("qwen2-vl", tmp_path_factory.mktemp("listener") / "qwen2-vl", corpus=world.corpus())


def test_listener_probabilities_are_the_next_token_decision_after_the_forced_prefix(tiny_listener):
    listener = Listener(VisionLanguageModel.from_pretrained(tiny_listener))
    questions = world.question_set(["prefer"], 3)
    conversations = [q.conversation() for q in questions]
    reasonings = [q.thinking for q in questions]
    probs = listener.probabilities(conversations, reasonings)
    assert probs.shape == (3, 2) and torch.allclose(probs.sum(1), torch.ones(3))
    vlm = listener.vlm
    for i, (conversation, z) in enumerate(zip(conversations, reasonings)):  # an independent path: generate()
        prompts = vlm.encode([conversation])
        prefix, _ = vlm.completion_tokens([f"<think>{z}</think><answer>"], end_of_turn=False)
        inputs = dict(prompts.inputs)
        inputs["input_ids"] = torch.cat([prompts.input_ids, prefix], 1)
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(prefix)], 1)
        out = vlm.model.generate(
            **inputs, max_new_tokens=1, do_sample=False, output_scores=True, return_dict_in_generate=True
        )
        scores = out.scores[0][0, listener.decision_ids]
        torch.testing.assert_close(probs[i], torch.softmax(scores, -1), atol=1e-5, rtol=1e-5)
    with torch.no_grad():  # equal decision logits → exactly one half each
        head = vlm.model.lm_head.weight
        head[listener.decision_ids[1]] = head[listener.decision_ids[0]]
    torch.testing.assert_close(listener.probabilities(conversations, reasonings), torch.full((3, 2), 0.5))


def _run(policy: Path, out: Path, *extra: str):
    return load_config(
        ROOT / "configs/vlm/listener_grpo.yaml",
        [
            f"model.path={policy}",
            f"listener_grpo.listener={policy}",
            f"output_dir={out}",
            "train.max_steps=2",
            "train.batch_size=2",
            "train.checkpoint_every=2",
            "train.log_every=1",
            "eval.every=0",
            "listener_grpo.num_generations=3",
            "listener_grpo.max_new_tokens=8",
            "data.embedded.eval_per_kind=4",
            *extra,
        ],
    )


class _CPU:
    device, num_processes, process_index = torch.device("cpu"), 1, 0


def test_shaped_reward_bounds_flip_and_densification(tiny_listener, tmp_path):
    method = ListenerGRPO(_run(tiny_listener, tmp_path / "r"))
    method.setup(_CPU())
    q = world.question_set(["prefer"], 1)[0]
    conversation, wrong = q.conversation(), "2" if q.answer == "1" else "1"
    responses = [
        f"<think>{q.thinking}</think><answer>{q.answer}</answer>",  # well-formed, correct
        f"<think>image 1 and image 2</think><answer>{q.answer}</answer>",  # correct, other reasoning
        f"<answer>{q.answer}</answer>",  # ill-formed but a parsable correct answer
        "no idea",
    ]
    r_list, contradiction = method.listener_rewards([conversation] * 4, responses, [q.answer] * 4)
    flipped, _ = method.listener_rewards([conversation] * 4, responses, [wrong] * 4)
    assert ((r_list >= 0) & (r_list <= 1)).all()
    torch.testing.assert_close(flipped[:2], 1 - r_list[:2])
    assert r_list[2] == 0 and r_list[3] == 0 and contradiction[2:].isnan().all()
    base, _ = weighted_rewards(method.config.rewards, responses, [q.answer] * 4)
    total = base + method.config.listener_weight * r_list
    assert ((total >= 0) & (total <= 2)).all() and total[2] == 0.5 and total[3] == 0
    # both correct and well formed: accuracy-only GRPO ties them, the listener separates them
    assert torch.equal(group_advantages(base[:2], 2), torch.zeros(2))
    assert r_list[0] != r_list[1] and (group_advantages(total[:2], 2) != 0).all()


def test_recipe_trains_the_reasoner_and_leaves_the_listener_frozen(tiny_listener, tmp_path):
    method = ListenerGRPO(_run(tiny_listener, tmp_path / "frozen"))
    method.setup(_CPU())
    before = {k: v.clone() for k, v in method.listener.vlm.model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in method.trainable_module().parameters() if p.requires_grad], lr=0.1)
    torch.manual_seed(0)
    batch = method.next_batch(0, 0)
    batch.advantages = torch.linspace(-1, 1, len(batch.advantages))
    loss, metrics = method.compute_loss(batch, 0, 0)
    loss.backward()
    optimizer.step()
    assert "listener_contradiction" in metrics and "reward/listener" in metrics
    assert not any(p.requires_grad for p in method.listener.vlm.model.parameters())
    assert all(torch.equal(before[k], v) for k, v in method.listener.vlm.model.state_dict().items())
    report = mmalign.train(_run(tiny_listener, tmp_path / "cli"))
    assert report["method"] == "listener-grpo" and "accuracy/prefer" in report["metrics"]["after"]
