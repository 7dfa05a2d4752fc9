"""The `arithmetic` task: evaluate an integer expression, e.g. "Compute 23 + 45 * 7".

Difficulty d sets the number of operands (2 + (d-1)//2), the digits per operand (1 + d//2) and the
operators (+ - from level 1, * from level 2); from three operands on the expression is a random tree,
so parentheses appear. No division: every answer is an integer, possibly negative.
"""

from __future__ import annotations

import random
from typing import Any

from r1mega.data.tasks import expr


def shape(difficulty: int) -> tuple[int, int, str]:
    """(operands, digits per operand, operators) of a difficulty level."""
    return 2 + (difficulty - 1) // 2, 1 + difficulty // 2, "+-" if difficulty == 1 else "+-*"


def generate(rng: random.Random, difficulty: int) -> dict[str, Any]:
    operands, digits, ops = shape(difficulty)
    low = 0 if digits == 1 else 10 ** (digits - 1)
    tree = expr.random_tree(rng, [rng.randint(low, 10 ** digits - 1) for _ in range(operands)], ops)
    text = expr.to_text(tree)
    return {"prompt": f"Compute {text}", "answer": expr.number_text(expr.evaluate(tree)), "expression": text}


def worked(sample: dict[str, Any], rng: random.Random, wrong: bool) -> tuple[list[str], str]:
    """(reasoning lines, final answer): one operation per line, the last one miscomputed when `wrong`,
    and now and then a check of the last step (which puts "verify", "check" in the demonstrations)."""
    steps = expr.steps(expr.parse(sample["expression"]))
    lines = [f"{a} {op} {b} = {expr.number_text(v)}." for a, op, b, v in steps]
    answer = sample["answer"]
    if wrong:
        delta = rng.choice([-1, 1]) * rng.choice([1, 1, 2, 10, 100])
        answer = str(int(answer) + delta)
        a, op, b, _ = steps[-1]
        lines[-1] = f"{a} {op} {b} = {answer}."
    elif rng.random() < 0.25:
        a, op, b, v = steps[-1]
        lines.append(f"Let me verify: {a} {op} {b} = {expr.number_text(v)}, so the check is correct.")
    return lines, answer
