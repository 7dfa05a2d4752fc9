"""Countdown accuracy: the answer must be an expression that uses `sample["numbers"]` exactly (as a
multiset) and evaluates to `sample["target"]`. Score 1 or 0.

The stored "answer" is only one solution among possibly many, so the expression is evaluated, not
compared. The answer text comes from the <answer> block or \\boxed{} (as for maths); a trailing
"= target" is allowed. Parsing and exact (fraction) evaluation are r1mega.data.tasks.expr's, the same
rules that generated the task. Deliberately left out: intermediate-value rules (negative or
fractional intermediate values are accepted when the final value is right).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Mapping

from r1mega.data.tasks import expr
from r1mega.rewards.math_accuracy import extract_answer
from r1mega.rewards.registry import RewardOutput, register_reward

MAX_ANSWER_CHARS = 200  # a longer "expression" cannot use a handful of numbers; refuse before parsing


def _leaves(node: expr.Expr) -> list[int]:
    return [node] if isinstance(node, int) else _leaves(node.left) + _leaves(node.right)


@register_reward("countdown_accuracy")
def countdown_accuracy(completion: str, sample: Mapping[str, Any]) -> RewardOutput:
    if "numbers" not in sample or "target" not in sample:
        return RewardOutput(0.0, "sample has no 'numbers' and 'target'")
    text = extract_answer(completion)
    if text is None:
        return RewardOutput(0.0, "no <answer> block or \\boxed{} in the completion")
    text = text.split("=")[0].strip()
    if len(text) > MAX_ANSWER_CHARS:
        return RewardOutput(0.0, "answer too long")
    try:
        tree = expr.parse(text)
        value = expr.evaluate(tree)
    except (ValueError, SyntaxError, ZeroDivisionError, RecursionError) as exc:
        return RewardOutput(0.0, f"answer {text[:40]!r} is not a valid expression: {type(exc).__name__}")
    if Counter(_leaves(tree)) != Counter(int(n) for n in sample["numbers"]):
        return RewardOutput(0.0, f"answer {text[:40]!r} does not use the numbers {list(sample['numbers'])} exactly once")
    if value != int(sample["target"]):
        return RewardOutput(0.0, f"answer {text[:40]!r} = {expr.number_text(value)}, not {sample['target']}")
    return RewardOutput(1.0)
