"""The `countdown` task: reach a target from given numbers, each used exactly once, with + - * /.

The answer is an expression; the stored "answer" is one solution, but any expression that uses the
multiset "numbers" exactly and evaluates to "target" is correct, so a reward must evaluate it rather
than compare strings. Generation draws the numbers and combines them by a random tree whose every
intermediate value is a positive integer (the game's rule), keeping it when the target lies in
1..999, so a solution always exists. Difficulty d: 2 + d numbers (at most 6), each up to 10, 25, 50, then 100.
"""

from __future__ import annotations

import random
from fractions import Fraction
from typing import Any

from r1mega.data.tasks import expr

MAX_TARGET = 999


def shape(difficulty: int) -> tuple[int, int]:
    """(how many numbers, largest number) of a difficulty level."""
    return min(2 + difficulty, 6), {1: 10, 2: 25, 3: 50}.get(difficulty, 100)


def _build(rng: random.Random, numbers: list[int]) -> tuple[expr.Expr, int]:
    """A random tree over `numbers` in order, each operator drawn among those that keep the game's
    rule (every intermediate value a positive integer) and products within MAX_TARGET."""
    if len(numbers) == 1:
        return numbers[0], numbers[0]
    cut = rng.randint(1, len(numbers) - 1)
    (left, a), (right, b) = _build(rng, numbers[:cut]), _build(rng, numbers[cut:])
    allowed = {"+": a + b}
    if a > b:
        allowed["-"] = a - b
    if a * b <= MAX_TARGET:
        allowed["*"] = a * b
    if a % b == 0:
        allowed["/"] = a // b
    op = rng.choice(sorted(allowed))
    return expr.BinOp(op, left, right), allowed[op]


def _prompt(numbers: list[int], target: int) -> str:
    listed = ", ".join(map(str, numbers))
    return f"Using the numbers {listed}, each exactly once, and + - * / with parentheses, write an expression equal to {target}"


def generate(rng: random.Random, difficulty: int) -> dict[str, Any]:
    count, largest = shape(difficulty)
    while True:
        numbers = [rng.randint(1, largest) for _ in range(count)]
        tree, target = _build(rng, numbers)
        if target <= MAX_TARGET:
            break
    shown = sorted(numbers)  # the prompt must not give away the solution's order
    return {"prompt": _prompt(shown, target), "answer": expr.to_text(tree), "numbers": shown, "target": target}


def worked(sample: dict[str, Any], rng: random.Random, wrong: bool) -> tuple[list[str], str]:
    """(reasoning lines, final answer): sometimes a failed attempt first ("Wait ... wrong ... Retry"),
    then an expression worked out step by step; when `wrong`, a near miss that misses the target."""
    lines = []
    if rng.random() < 0.3:
        attempt = expr.random_tree(rng, rng.sample(sample["numbers"], len(sample["numbers"])), "+-*")
        value = expr.evaluate(attempt)
        if value != sample["target"]:
            lines += [f"Try {expr.to_text(attempt)} = {expr.number_text(value)}.",
                      f"Wait, {expr.number_text(value)} is not {sample['target']}, that is wrong. Retry."]
    answer = _near_miss(sample, rng) if wrong else sample["answer"]
    lines.append(f"Try {answer}.")
    lines += [f"{a} {op} {b} = {expr.number_text(v)}." for a, op, b, v in expr.steps(expr.parse(answer))]
    return lines, answer


def _near_miss(sample: dict[str, Any], rng: random.Random) -> str:
    """The solution with one operator changed, else a - b - ...: never the target."""
    tree = expr.parse(sample["answer"])
    for _ in range(20):
        candidate = _swap_one_op(tree, rng)
        try:
            if expr.evaluate(candidate) != Fraction(sample["target"]):
                return expr.to_text(candidate)
        except ZeroDivisionError:
            pass
    # Smallest minus the others is <= 0, below any target.
    return " - ".join(map(str, sorted(sample["numbers"])))


def _swap_one_op(tree: expr.Expr, rng: random.Random) -> expr.Expr:
    if isinstance(tree, int):
        return tree
    choice = rng.randrange(3)
    if choice == 0:
        return expr.BinOp(rng.choice([o for o in "+-*/" if o != tree.op]), tree.left, tree.right)
    if choice == 1:
        return expr.BinOp(tree.op, _swap_one_op(tree.left, rng), tree.right)
    return expr.BinOp(tree.op, tree.left, _swap_one_op(tree.right, rng))
