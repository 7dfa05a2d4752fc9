"""The `chain` task: a left-to-right chain of one-digit additions and subtractions, "Compute 3+4-2".

Difficulty d gives d + 1 operands, drawn so that every running total stays a digit (0 to 9): each step
is one of the 110 one-digit facts a tiny model learns at once, while the whole chain, done "in the
head" in one forward pass, is beyond it. Every held-out question is a new chain of facts that training
questions also use, so a model that works step by step can answer questions it never saw, and longer
chains than it trained on: the embedded default's task (strategies.py: how its answers are written).
The text has no spaces, so that every digit and operator is one token.
"""

from __future__ import annotations

import random
from typing import Any

from r1mega.data.tasks import arithmetic, expr


def generate(rng: random.Random, difficulty: int) -> dict[str, Any]:
    total = rng.randint(0, 9)
    tree: expr.Expr = total
    for _ in range(difficulty):
        op = rng.choice("+-")
        digit = rng.randint(0, 9 - total) if op == "+" else rng.randint(0, total)
        tree, total = expr.BinOp(op, tree, digit), total + digit if op == "+" else total - digit
    text = expr.to_text(tree).replace(" ", "")
    return {"prompt": f"Compute {text}", "answer": str(total), "expression": text}


worked = arithmetic.worked
