"""The ways a worked solution of a `chain` question is written: the mixture the tiny base model
pretrains on, and what GRPO chooses among.

- "direct": the answer at once, with no working. Right only when the model can add up the whole chain
  "in its head", which a tiny model cannot for long chains.
- "steps": one operation per sentence, then what is left of the chain ("3+4=7, so 7-2+1. 7-2=5, so 5+1.
  5+1=6."): each step reads its operands from the sentence before, not from a position in the question.
- "check": the same, each hard operation (second operand HARD_FROM or more) followed by its check by the
  inverse operation ("3+6=9, check: 9-6=3 vs 3, right, so ..."). Longer, and the only one that catches
  a slip: a slipped step's check does not give back the operand, and the step is redone ("3+6=8, check:
  8-6=2 vs 3, wrong. Wait, redo: 3+6=9, check: 9-6=3 vs 3, right, so ...").

A hurried writer slips on hard operations, with probability `slip_rate` each (in "steps" and "check"),
always to the same wrong value for the same operation, one off (which the rest of a "steps" solution
carries on from); easy ones never slip. A slip is thus one fixed belief about the fact, held at that rate,
not noise: sampling colder does not remove it from the base model, and unlearning it takes one
fact at a time, while checking catches every one. Nothing here is scored: the rewards see the final
answer and the tags only.
"""

from __future__ import annotations

import random
from typing import Any, Callable

STRATEGIES = ("direct", "steps", "check")
_INVERSE = {"+": "-", "-": "+"}
HARD_FROM = 5  # an operation is hard, and may slip, when its second operand is at least this


def _slipped(a: int, op: str, b: int, value: int) -> int:
    """The one wrong value a hurried writer gives for this operation: one off, up or down as the operands
    fall (not by one rule the model could unlearn in one move), within 0..9."""
    off = 1 if (a + 2 * b + (op == "+")) % 2 else -1
    return value + off if 0 <= value + off <= 9 else value - off


def _checked(a: int, op: str, b: int, value: int) -> str:
    """`a op b = value, check: value inv b = back vs a, right|wrong`: the verdict follows the number it
    compares with, so that the comparison is between neighbours."""
    back = value - b if op == "+" else value + b
    return f"{a}{op}{b}={value}, check: {value}{_INVERSE[op]}{b}={back} vs {a}, {'right' if back == a else 'wrong'}"


def write(sample: dict[str, Any], strategy: str, rng: random.Random, slip_rate: float) -> tuple[list[str], str]:
    """(sentences of the thought, final answer) of a chain sample (`sample["expression"]`, + and - only)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}: expected one of {list(STRATEGIES)}")
    if strategy == "direct":
        return ["I can see it at once."], sample["answer"]
    text = sample["expression"]  # digits and operators alternate: "7+2-5+5"
    total, lines = int(text[0]), []
    for i in range(1, len(text), 2):  # each step's left operand is the running total
        a, op, b, rest = total, text[i], int(text[i + 1]), text[i + 2:]
        right = a + b if op == "+" else a - b
        hard = b >= HARD_FROM
        value = _slipped(a, op, b, right) if hard and rng.random() < slip_rate else right
        if strategy == "check" and hard:
            work = _checked(a, op, b, value)
            if value != right:
                work += ". Wait, redo: " + _checked(a, op, b, right)
                value = right
        else:
            work = f"{a}{op}{b}={value}"
        lines.append(f"{work}, so {value}{rest}." if rest else f"{work}.")
        total = value
    return lines, str(total)


def strategy_sampler(mixture: dict[str, float]) -> Callable[[random.Random], str]:
    """A function drawing a strategy with the mixture's weights (which need not sum to 1); the mixture
    is checked once, here."""
    unknown = sorted(set(mixture) - set(STRATEGIES))
    if unknown or not mixture or min(mixture.values()) < 0 or sum(mixture.values()) <= 0:
        raise ValueError(f"model.base_strategies={mixture}: expected non-negative weights, not all 0, over "
                         f"{list(STRATEGIES)}" + (f" (unknown: {unknown})" if unknown else ""))
    names = sorted(mixture)
    weights = [mixture[n] for n in names]
    return lambda rng: rng.choices(names, weights=weights)[0]
