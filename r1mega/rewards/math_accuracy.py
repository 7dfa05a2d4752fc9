"""Maths accuracy: is the completion's final answer equivalent to the ground truth? Score 1 or 0.

The answer is taken from the last `<answer>...</answer>` block (R1-Zero format) or, failing that, from
the last `\\boxed{...}` (inside the answer block when it has one). A completion with neither scores 0:
R1 rewards answers "in a required format". The extracted text and the ground truth (`sample["answer"]`,
a plain string such as "1/2", "0.5", "\\{1,2\\}" or "(0,1]", or a number) are both parsed by math-verify
(`parse_math`: prose such as "The answer is 5" as math-verify's users parse model output, bare maths as
LaTeX), which decides equivalence (fractions = decimals, sets up to order, intervals, symbolic
expressions). There is no hand-written grader here.

math-verify bounds its own parsing and comparison time with SIGALRM, which only works in a process's
main thread; elsewhere we switch its timeouts off and rely on the scoring pool's timeout.
Deliberately left out: units, multiple-choice letters and answers spread over several boxes.
"""

from __future__ import annotations

import re
import threading
from typing import Any, Mapping

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from r1mega.rewards.registry import RewardOutput, register_reward

MATH_VERIFY_TIMEOUT_S = 5
_EXTRACTION = [LatexExtractionConfig(), ExprExtractionConfig()]
_ANSWER_OPEN, _ANSWER_CLOSE, _BOXED = "<answer>", "</answer>", "\\boxed{"
_DELIMITERS = ("$", "\\(", "\\[", "\\boxed")
# A word of prose: two or more letters that are not a LaTeX command's name ("\\frac", "\\sqrt").
_PROSE_WORD = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}")


def _last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` in `text`, braces matched; None if there is none or it is unclosed."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, begin = 1, start + len(_BOXED)
    for i in range(begin, len(text)):
        if text[i] == "{" and text[i - 1] != "\\":
            depth += 1
        elif text[i] == "}" and text[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[begin:i]
    return None


def extract_answer(completion: str) -> str | None:
    """The final answer's text: the last <answer> block's content (or the last \\boxed{} in it), else
    the last \\boxed{} of the completion; None when the completion states no answer in either form."""
    close = completion.rfind(_ANSWER_CLOSE)
    open_ = completion.rfind(_ANSWER_OPEN, 0, close) if close >= 0 else -1
    if open_ >= 0:
        block = completion[open_ + len(_ANSWER_OPEN): close]
        boxed = _last_boxed(block)
        return (boxed if boxed is not None else block).strip()
    boxed = _last_boxed(completion)
    return boxed.strip() if boxed is not None else None


def _timeout() -> int | None:
    return MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def parse_math(text: str) -> list:
    """math-verify's parse of an answer string, read as its users read a model's answer.

    Text with maths delimiters or words ("The answer is 5", "so it is 7 apples", "It is $\\sqrt{18}$")
    goes to math-verify as it is: its LaTeX extraction (delimiters, \\boxed{}, "answer is ...") and its
    plain-expression extraction find the maths in it. Bare maths ("\\frac{1}{2}", "\\{1,2\\}", "(0,1]",
    "3\\sqrt{2}") is read as LaTeX between $...$, where the expression extraction alone would take "(0,1]"
    for 1 and "3\\sqrt{2}" for 3; so is prose in which math-verify finds nothing ("sqrt(2)")."""
    delimited = any(d in text for d in _DELIMITERS)
    if delimited or _PROSE_WORD.search(text):
        found = _parse(text)
        if found or delimited:
            return found
    return _parse(f"${text}$")


def _parse(text: str) -> list:
    return parse(text, extraction_config=_EXTRACTION, parsing_timeout=_timeout())


def answers_match(predicted: str, truth: str) -> bool:
    gold, pred = parse_math(truth), parse_math(predicted)
    return bool(gold and pred and verify(gold, pred, timeout_seconds=_timeout()))


@register_reward("math_accuracy")
def math_accuracy(completion: str, sample: Mapping[str, Any]) -> RewardOutput:
    if sample.get("answer") is None:
        return RewardOutput(0.0, "sample has no 'answer'")
    predicted = extract_answer(completion)
    if predicted is None:
        return RewardOutput(0.0, "no <answer> block or \\boxed{} in the completion")
    truth = str(sample["answer"])
    gold, pred = parse_math(truth), parse_math(predicted)
    if not gold:
        return RewardOutput(0.0, f"ground truth {truth[:60]!r} could not be parsed")
    if not pred:
        return RewardOutput(0.0, f"answer {predicted[:60]!r} could not be parsed")
    if verify(gold, pred, timeout_seconds=_timeout()):
        return RewardOutput(1.0)
    return RewardOutput(0.0, f"answer {predicted[:60]!r} differs from {truth[:60]!r}")
