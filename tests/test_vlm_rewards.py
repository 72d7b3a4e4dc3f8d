"""Verifiable VLM rewards on real-looking answers: extraction, numbers, choices, maths, user functions."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Sequence

import pytest
import torch

from mmalign.config import from_dict
from mmalign.vlm.rewards import (
    REWARD_FUNCTIONS,
    RewardTerm,
    choice_reward,
    final_answer,
    math_reward,
    numeric_reward,
    parse_choice,
    parse_number,
    weighted_rewards,
)


def my_reward(completions: list[str], answers: list[str], bonus: float = 0.0) -> list[float]:
    """A user reward loaded by import path in the tests: 1 + bonus for a completion longer than 3 characters."""
    return [float(len(c) > 3) + bonus for c in completions]


def short_reward(completions: list[str], answers: list[str]) -> list[float]:
    return [1.0]


def nan_reward(completions: list[str], answers: list[str]) -> list[float]:
    return [float("nan")] * len(completions)


NOT_CALLABLE = 3


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("<think>add</think><answer> 42 </answer>", "42"),
        ("<answer>1</answer> then <answer>2</answer>", "2"),
        ("<answer>so \\boxed{7}</answer>", "7"),  # a box inside the answer block
        ("first \\boxed{1}, finally \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
        ("\\boxed{\\{1, \\{2\\}\\}}", "\\{1, \\{2\\}\\}"),  # nested braces
        ("\\boxed{3} and a cut-off \\boxed{\\frac{1", "3"),  # unbalanced box skipped
        ("  The answer is 5.  ", "The answer is 5."),
    ],
)
def test_final_answer_prefers_answer_block_then_last_box_then_the_text(completion, expected):
    assert final_answer(completion) == expected


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("42", 42.0),
        ("-3", -3.0),
        ("−3", -3.0),  # unicode minus
        ("0.75", 0.75),
        (".5", 0.5),
        ("1,234", 1234.0),
        ("$1,234.50", 1234.5),
        ("-$5", -5.0),
        ("50%", 50.0),  # as written, not 0.5
        ("50\\%", 50.0),
        ("3/4", 0.75),
        ("-3/4", -0.75),
        ("\\frac{3}{4}", 0.75),
        ("\\dfrac{3}{4}", 0.75),
        ("-\\frac{1}{2}", -0.5),
        ("$\\frac{3}{4}$", 0.75),
        ("12 cm", 12.0),
        ("5 apples", 5.0),
        ("3 m^2", 3.0),
        ("90^\\circ", 90.0),
        ("4\\text{ kg}", 4.0),
        ("x = 3", 3.0),
        ("1e-3", 0.001),
        ("5.", 5.0),
        ("12,34", None),  # not a thousands separator
        ("1/0", None),
        ("1e999", None),
        ("three", None),
        ("The answer is 5", None),  # prose around the number
        ("3 4", None),
        ("", None),
    ],
)
def test_parse_number_table(text, value):
    assert parse_number(text) == (pytest.approx(value) if value is not None else None)


@pytest.mark.parametrize(
    ("completion", "answer", "reward"),
    [
        ("<answer>0.75</answer>", "3/4", 1.0),
        ("<answer>\\frac{3}{4}</answer>", "0.75", 1.0),
        ("\\boxed{\\dfrac{3}{4}}", "3/4", 1.0),
        ("<answer>12 cm</answer>", "12", 1.0),
        ("<answer>1,234</answer>", "1234", 1.0),
        ("<answer>$1,234</answer>", "1,234", 1.0),
        ("<answer>50%</answer>", "50", 1.0),
        ("<answer>50%</answer>", "0.5", 0.0),
        ("<answer>-7</answer>", "-7", 1.0),
        ("<answer>7</answer>", "-7", 0.0),
        ("<answer>x = 3</answer>", "3", 1.0),
        ("<answer>0.333</answer>", "1/3", 0.0),  # tight default tolerance
        ("<answer>0.7500001</answer>", "3/4", 1.0),
        ("<answer>about five</answer>", "5", 0.0),
        ("<answer>5</answer>", "five", 0.0),  # unparseable reference
        ("The answer is 5", "5", 0.0),  # no block, no box: the whole text is not a number
    ],
)
def test_numeric_reward_table(completion, answer, reward):
    assert numeric_reward([completion], [answer]) == [reward]


def test_numeric_tolerance_is_an_argument():
    assert numeric_reward(["<answer>0.333</answer>"], ["1/3"], rel_tol=0.01) == [1.0]
    assert numeric_reward(["<answer>0.001</answer>"], ["0"]) == [0.0]
    assert numeric_reward(["<answer>0.001</answer>"], ["0"], abs_tol=0.01) == [1.0]


@pytest.mark.parametrize(
    ("text", "letter"),
    [
        ("B", "B"),
        ("(B)", "B"),
        ("(b)", "B"),
        ("B.", "B"),
        ("B) 42 apples", "B"),
        ("C. 42", "C"),
        ("[d]", "D"),
        ("Answer: C", "C"),
        ("The answer is (C).", "C"),
        ("The answer is C.", "C"),
        ("I think the correct option is **a**", "A"),
        ("A cat", None),  # a letter starting prose is no choice
        ("42", None),
        ("", None),
    ],
)
def test_parse_choice_table(text, letter):
    assert parse_choice(text) == letter


@pytest.mark.parametrize(
    ("completion", "answer", "reward"),
    [
        ("<answer>(B)</answer>", "B", 1.0),
        ("<think>…</think><answer>The answer is C.</answer>", "(C)", 1.0),
        ("<answer>c</answer>", "C) 12 apples", 1.0),
        ("\\boxed{D}", "D.", 1.0),
        ("<answer>A</answer>", "B", 0.0),
        ("<answer>none of them</answer>", "B", 0.0),
        ("<answer>B</answer>", "12", 0.0),  # unparseable reference
    ],
)
def test_choice_reward_table(completion, answer, reward):
    assert choice_reward([completion], [answer]) == [reward]


MATH_CASES = [
    ("\\boxed{\\frac{1}{2}}", "1/2", 1.0),
    ("<answer>0.75</answer>", "\\frac{3}{4}", 1.0),
    ("<answer>3/4</answer>", "0.75", 1.0),
    ("<answer>2\\sqrt{2}</answer>", "\\sqrt{8}", 1.0),
    ("The final answer is $\\boxed{2\\sqrt{2}}$.", "2\\sqrt{2}", 1.0),
    ("<answer>2</answer>", "x=2", 1.0),
    ("<answer>\\{2, 1\\}</answer>", "{1,2}", 1.0),
    ("<answer>12 cm</answer>", "12", 1.0),
    ("<answer>2</answer>", "2\\sqrt{2}", 0.0),
    ("<answer>\\sqrt{2}</answer>", "\\sqrt{8}", 0.0),
    ("<answer>\\frac{2}{3}</answer>", "3/4", 0.0),
    ("<answer>Paris.</answer>", "paris", 1.0),  # neither side parses: normalised exact match
    ("<answer>Rome</answer>", "paris", 0.0),
    ("<answer>no idea</answer>", "\\frac{1}{2}", 0.0),  # only the reference parses
]


def test_math_reward_table():
    completions, answers, expected = zip(*MATH_CASES)
    assert math_reward(completions, answers) == list(expected)


def test_math_reward_runs_outside_the_main_thread():
    """math-verify's SIGALRM timeout would raise in a worker thread; the reward turns it off there."""
    out: list[list[float]] = []
    worker = threading.Thread(
        target=lambda: out.append(math_reward(["\\boxed{\\sqrt{8}}", "\\boxed{3}"], ["2\\sqrt{2}"] * 2))
    )
    worker.start()
    worker.join()
    assert out == [[1.0, 0.0]]


def test_importing_the_rewards_leaves_math_verify_unloaded():
    code = "import sys, mmalign.vlm.rewards; print('math_verify' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "False\n"


def test_weighted_totals_and_parts():
    completions = ["<think>x</think><answer>3/4</answer>", "<answer>0.75</answer>", "\\boxed{0.5}"]
    terms = [RewardTerm("numeric", 0.5), RewardTerm("math", 0.3), RewardTerm("format", 0.2)]
    total, parts = weighted_rewards(terms, completions, ["\\frac{3}{4}"] * 3)
    torch.testing.assert_close(parts["numeric"], torch.tensor([1.0, 1.0, 0.0]))
    torch.testing.assert_close(parts["math"], torch.tensor([1.0, 1.0, 0.0]))
    torch.testing.assert_close(parts["format"], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(total, torch.tensor([1.0, 0.8, 0.0]))


def test_term_args_reach_the_function_and_come_from_config():
    term = from_dict(RewardTerm, {"name": "numeric", "weight": 2.0, "args": {"rel_tol": 0.01}})
    assert term.args == {"rel_tol": 0.01} and RewardTerm("numeric").args == {}
    total, _ = weighted_rewards([term], ["<answer>0.333</answer>"], ["1/3"])
    torch.testing.assert_close(total, torch.tensor([2.0]))
    total, _ = weighted_rewards([RewardTerm("numeric", 2.0)], ["<answer>0.333</answer>"], ["1/3"])
    torch.testing.assert_close(total, torch.tensor([0.0]))


def test_user_reward_by_import_path_with_args():
    name = "tests.test_vlm_rewards:my_reward"
    total, parts = weighted_rewards([RewardTerm(name, 0.5, {"bonus": 1.0})], ["long enough", "no"], ["?", "?"])
    torch.testing.assert_close(parts[name], torch.tensor([2.0, 1.0]))
    torch.testing.assert_close(total, torch.tensor([1.0, 0.5]))


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("speed", r"unknown reward function 'speed'; choose from \['accuracy', 'choice', .*package.module:function"),
        ("tests.no_such_module:f", r"'tests.no_such_module:f' cannot be imported"),
        ("tests.test_vlm_rewards:missing", r"'tests.test_vlm_rewards:missing' cannot be imported"),
        ("tests.test_vlm_rewards:NOT_CALLABLE", r"'tests.test_vlm_rewards:NOT_CALLABLE' is a int, not a function"),
        ("tests.test_vlm_rewards:short_reward", r"'tests.test_vlm_rewards:short_reward' must return a list of 2"),
        ("tests.test_vlm_rewards:nan_reward", r"'tests.test_vlm_rewards:nan_reward' .* not a finite float"),
    ],
)
def test_bad_reward_terms_raise_naming_the_term(name, message):
    with pytest.raises(ValueError, match=message):
        weighted_rewards([RewardTerm(name, 1.0)], ["a", "b"], ["a", "b"])


def test_unknown_argument_and_repeated_name_raise():
    with pytest.raises(TypeError, match="tolerance"):
        weighted_rewards([RewardTerm("numeric", 1.0, {"tolerance": 0.1})], ["1"], ["1"])
    with pytest.raises(ValueError, match="'accuracy' is listed twice"):
        weighted_rewards([RewardTerm("accuracy"), RewardTerm("accuracy")], ["1"], ["1"])


def test_every_builtin_returns_one_float_per_completion():
    completions: Sequence[str] = ["<think>a</think><answer>1</answer>", "", "\\boxed{B}"]
    for name, function in REWARD_FUNCTIONS.items():
        values = function(completions, ["1", "B", "B"])
        assert len(values) == 3 and all(isinstance(v, float) for v in values), name
