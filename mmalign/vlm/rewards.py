"""Verifiable rewards on VLM responses: the answer of a completion checked against the row's reference.

A reward function takes the decoded completions and the rows' reference answers and returns one float per
completion: `f(completions: list[str], answers: list[str], **args) -> list[float]`. `weighted_rewards`
combines a list of them (`RewardTerm`s, each with a weight and keyword `args`), as TRL's `reward_weights`
does. The built-ins (`REWARD_FUNCTIONS`):

- `format`: 1 for a well-formed `<think>…</think><answer>…</answer>` response.
- `accuracy`: the `<answer>` block equals the reference, case and spacing ignored.
- `numeric`: both answers parsed as numbers (`parse_number`) and equal within a tolerance.
- `choice`: the same multiple-choice letter (`parse_choice`).
- `math`: symbolically equal, by HuggingFace's `math-verify` (`3/4` = `\\frac{3}{4}` = `0.75`, `2\\sqrt{2}` =
  `\\sqrt{8}`, `x=2` = `2`, `{1,2}` = `\\{2,1\\}`).

`numeric`, `choice` and `math` read the answer of a completion with `final_answer` (the `<answer>` block,
else the last `\\boxed{}`, else the whole text) and pass the reference through it too, so a reference may be
a full solution ending in `\\boxed{}`. A term named `package.module:function` imports the user's own function
of the signature above.
"""

from __future__ import annotations

import importlib
import math
import numbers
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mmalign.config import ConfigError, option

RewardFunction = Callable[..., Sequence[float]]

#: one think block, then one answer block, nothing else around them
RESPONSE = re.compile(r"^\s*<think>(?P<think>.+?)</think>\s*<answer>(?P<answer>.+?)</answer>\s*$", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_BOXED = re.compile(r"\\boxed\s*\{")


def parse_response(text: str) -> tuple[str, str] | None:
    """`(thinking, answer)` of a well-formed response, None otherwise (tags missing, repeated or nested)."""
    match = RESPONSE.match(text)
    if match is None:
        return None
    thinking, answer = match["think"], match["answer"]
    if any(tag in thinking or tag in answer for tag in _TAGS):
        return None
    return thinking.strip(), answer.strip()


def extract_answer(text: str) -> str | None:
    """The content of the last `<answer>…</answer>` block, stripped, even if the format is otherwise wrong."""
    found = _ANSWER.findall(text)
    return found[-1].strip() if found else None


def extract_boxed(text: str) -> str | None:
    """The content of the last complete `\\boxed{…}` in `text` (nested braces kept), stripped; None if none.

    A `\\boxed{` whose braces never close (a truncated completion) is skipped for an earlier complete one.
    """
    for match in reversed(list(_BOXED.finditer(text))):
        depth = 1
        for end in range(match.end(), len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                return text[match.end() : end].strip()
    return None


def final_answer(text: str) -> str:
    """The answer a completion gives, as the `numeric`, `choice` and `math` rewards read it.

    The content of the last `<answer>…</answer>` block if there is one (and within it the last `\\boxed{}` if
    it has one); else the content of the last `\\boxed{…}` (balanced braces, nested ones kept); else the whole
    text. Stripped in every case.
    """
    answer = extract_answer(text)
    if answer is not None:
        return extract_boxed(answer) or answer
    boxed = extract_boxed(text)
    return boxed if boxed is not None else text.strip()


def normalise(answer: str) -> str:
    """`answer` lower-cased, with runs of whitespace made single spaces and a final full stop dropped."""
    return " ".join(answer.lower().strip().rstrip(".").split())


def format_reward(completions: Sequence[str], answers: Sequence[str]) -> list[float]:
    """1 for a well-formed `<think>…</think><answer>…</answer>` response, else 0."""
    return [float(parse_response(c) is not None) for c in completions]


def accuracy_reward(completions: Sequence[str], answers: Sequence[str]) -> list[float]:
    """1 when the answer block matches the reference answer (case and spacing ignored), else 0."""
    out = []
    for completion, answer in zip(completions, answers):
        given = extract_answer(completion)
        out.append(float(given is not None and normalise(given) == normalise(answer)))
    return out


# ---- numbers ----

_DIGITS = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d*)?(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?"
_UNIT = r"\\(?:text|mathrm|mbox)\{[^{}]*\}|\^\{?\\circ\}?|°|[A-Za-z]+(?![A-Za-z])(?:\^\{?\d\}?|[²³])?(?:/[A-Za-z]+)?"
_NUMBER = re.compile(
    rf"(?P<sign>[-+]?)\s*(?:"
    rf"\\[dt]?frac\{{\s*(?P<top>[-+]?(?:{_DIGITS}))\s*\}}\{{\s*(?P<bottom>[-+]?(?:{_DIGITS}))\s*\}}"
    rf"|(?P<numerator>{_DIGITS})(?:\s*/\s*(?P<denominator>{_DIGITS}))?"
    rf")\s*%?(?:\s*(?:{_UNIT}))*\s*\.?"
)
_VARIABLE = re.compile(r"^[A-Za-z](?:_\{?\w+\}?)?\s*=")  # `x =`, `x_1 =`
_LATEX_NOISE = {"\\%": "%", "\\$": "", "$": "", "\\,": "", "\\!": "", "−": "-"}


def parse_number(text: str) -> float | None:
    """The number written in `text`, None if it is not one number.

    Accepts integers and decimals (`-3`, `.5`, `1e-3`), thousands separators (`1,234`; `12,34` is not a
    number), a leading `$`, a trailing `%` (read as written: `50%` is 50, not 0.5), fractions `3/4`,
    LaTeX `\\frac{3}{4}`, `\\dfrac`, `\\tfrac`, trailing unit words (`12 cm`, `5 apples`, `3 m^2`, `90^\\circ`,
    `4\\text{ kg}`), a `x =` in front, math delimiters `$…$`, `\\(…\\)` and a final full stop. Anything else —
    prose around the number, two numbers, a zero denominator, a non-finite value — gives None.
    """
    text = text.strip().removeprefix("\\(").removesuffix("\\)").removeprefix("\\[").removesuffix("\\]")
    for old, new in _LATEX_NOISE.items():
        text = text.replace(old, new)
    text = _VARIABLE.sub("", text.strip(), count=1)
    match = _NUMBER.fullmatch(text.strip())
    if match is None:
        return None
    if match["top"] is not None:
        top, bottom = match["top"], match["bottom"]
    else:
        top, bottom = match["numerator"], match["denominator"] or "1"
    top_value, bottom_value = float(top.replace(",", "")), float(bottom.replace(",", ""))
    if bottom_value == 0:
        return None
    value = (-1 if match["sign"] == "-" else 1) * top_value / bottom_value
    return value if math.isfinite(value) else None


def numeric_reward(
    completions: Sequence[str], answers: Sequence[str], rel_tol: float = 1e-4, abs_tol: float = 1e-6
) -> list[float]:
    """1 when the completion's `final_answer` and the reference parse (`parse_number`) to close numbers.

    Close is `math.isclose(given, reference, rel_tol=rel_tol, abs_tol=abs_tol)`. The defaults are tight:
    `0.333` is not `1/3` (loosen with `args: {rel_tol: 0.01}`). An answer or reference that is not a number
    gives 0.
    """
    out = []
    for completion, answer in zip(completions, answers):
        given, reference = parse_number(final_answer(completion)), parse_number(final_answer(answer))
        close = given is not None and reference is not None
        out.append(float(close and math.isclose(given, reference, rel_tol=rel_tol, abs_tol=abs_tol)))
    return out


# ---- multiple choice ----

_CHOICE_LEAD = re.compile(r"(?:answer|option|choice)\s*(?:is\b|:)\s*", re.IGNORECASE)
_CHOICE = re.compile(r"\((?P<a>[A-Za-z])\)|\[(?P<b>[A-Za-z])\]|(?P<c>[A-Za-z])(?:[.):]|$)")


def parse_choice(text: str) -> str | None:
    """The multiple-choice letter (upper-case A–Z) that `text` gives, None if it gives none.

    Reads what follows the last `answer is` / `answer:` / `option is` / `choice:` (any case), or the whole text:
    a letter in parentheses or brackets (`(b)`, `[C]`), or a letter alone or followed by `.`, `)` or `:`
    (`B`, `C. 42`, `B) text`). A letter followed by a space and more text (`A cat`) is not a choice.
    """
    text = text.replace("*", "").strip()
    leads = list(_CHOICE_LEAD.finditer(text))
    if leads:
        text = text[leads[-1].end() :]
    match = _CHOICE.match(text.strip())
    if match is None:
        return None
    return (match["a"] or match["b"] or match["c"]).upper()


def choice_reward(completions: Sequence[str], answers: Sequence[str]) -> list[float]:
    """1 when the completion's `final_answer` names the reference's letter (`parse_choice`), else 0."""
    out = []
    for completion, answer in zip(completions, answers):
        given, reference = parse_choice(final_answer(completion)), parse_choice(final_answer(answer))
        out.append(float(given is not None and given == reference))
    return out


# ---- symbolic maths (math-verify) ----

_DELIMITED = re.compile(r"\$|\\\(|\\\[|\\boxed")
_WORD = re.compile(r"(?:^|\s)[A-Za-z]{2,}[.,:;!?]?(?=\s|$)")  # `12 cm`, `The answer is 3/4`, not `2\sqrt{2}`


def _math_parse(text: str, timeout: int | None) -> list[Any]:
    """math-verify's readings of `text`: a bare expression (`2\\sqrt{2}`, `x=2`) is read as LaTeX in `$…$`
    (its plain parse would read `2`), then plainly if that yields nothing; delimited LaTeX and prose
    (`12 cm`, `the answer is 3/4`) are read plainly, since `$…$` would turn their words into products."""
    from math_verify import parse

    if _DELIMITED.search(text) or _WORD.search(text):
        return parse(text, parsing_timeout=timeout)
    return parse(f"${text}$", parsing_timeout=timeout) or parse(text, parsing_timeout=timeout)


def math_reward(completions: Sequence[str], answers: Sequence[str], timeout: int = 5) -> list[float]:
    """1 when the completion's `final_answer` is symbolically equal to the reference, by `math_verify.verify`.

    Either side may be bare (`3/4`, `\\frac{3}{4}`, `2\\sqrt{2}`, `x=2`, `{1,2}`), delimited (`$…$`) or prose.
    When neither parses, the normalised strings must match exactly (as `accuracy`); when only one parses, 0.
    `timeout` bounds each parse and comparison in seconds, with math-verify's SIGALRM timer, which works in
    the main thread only: elsewhere (a trainer's worker thread) it is off (`parsing_timeout=None`,
    `timeout_seconds=None`), so a pathological expression can take long there.
    """
    from math_verify import verify

    seconds = timeout if threading.current_thread() is threading.main_thread() else None
    out = []
    for completion, answer in zip(completions, answers):
        given_text, reference_text = final_answer(completion), final_answer(answer)
        given, reference = _math_parse(given_text, seconds), _math_parse(reference_text, seconds)
        if not given and not reference:
            out.append(float(normalise(given_text) == normalise(reference_text)))
        else:
            out.append(float(bool(given and reference) and verify(reference, given, timeout_seconds=seconds)))
    return out


REWARD_FUNCTIONS: dict[str, RewardFunction] = {
    "accuracy": accuracy_reward,
    "choice": choice_reward,
    "format": format_reward,
    "math": math_reward,
    "numeric": numeric_reward,
}


@dataclass
class RewardTerm:
    """One weighted reward function of the total `r = Σ weight · f(completions, answers, **args)`."""

    name: str = option(
        f"reward function: one of {sorted(REWARD_FUNCTIONS)}, or package.module:function", default="accuracy"
    )
    weight: float = option("its weight in the total reward", default=1.0)
    args: dict[str, Any] = option("keyword arguments of the function, e.g. {rel_tol: 0.01}", default_factory=dict)

    def check_values(self, prefix: str) -> None:
        """The function must exist when the config is built, not at the first rollout."""
        try:
            reward_function(self.name)
        except ConfigError as exc:
            raise ConfigError(f"config key '{prefix}name': {exc}") from None


def reward_function(name: str) -> RewardFunction:
    """The function a `RewardTerm.name` names: a built-in of `REWARD_FUNCTIONS`, or `package.module:function`.

    Raises a `ConfigError` for an unknown built-in, a module or attribute that cannot be imported, or an object
    that is not callable.
    """
    if ":" not in name:
        if name not in REWARD_FUNCTIONS:
            raise ConfigError(
                f"unknown reward function {name!r}; choose from {sorted(REWARD_FUNCTIONS)} or give your own as "
                "package.module:function"
            )
        return REWARD_FUNCTIONS[name]
    module_name, _, attribute = name.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(f"reward function {name!r} cannot be imported: {error}") from error
    if not callable(function):
        raise ConfigError(f"reward function {name!r} is a {type(function).__name__}, not a function")
    return function


def weighted_rewards(
    terms: Sequence[RewardTerm], completions: Sequence[str], answers: Sequence[str]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total reward `(B,)` and each function's raw values `{name: (B,)}`.

    Each term's function is called as `f(list(completions), list(answers), **term.args)` and must return one
    finite real number per completion; otherwise, or if a name is given twice, a `ConfigError` names the term.
    """
    completions, answers = list(completions), list(answers)
    total = torch.zeros(len(completions), dtype=torch.float32)
    parts = {}
    for term in terms:
        if term.name in parts:
            raise ConfigError(f"reward function {term.name!r} is listed twice; give it once")
        values = reward_function(term.name)(completions, answers, **term.args)
        if not isinstance(values, Sequence) or len(values) != len(completions):
            raise ConfigError(f"reward function {term.name!r} must return a list of {len(completions)} floats")
        if not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in values):
            raise ConfigError(f"reward function {term.name!r} returned a value that is not a finite float")
        parts[term.name] = torch.tensor([float(v) for v in values], dtype=torch.float32)
        total += term.weight * parts[term.name]
    return total, parts
