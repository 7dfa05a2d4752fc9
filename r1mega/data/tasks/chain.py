"""The `chain` task: a left-to-right chain of one-digit additions and subtractions, "Compute 3 + 4 - 2".

Difficulty d gives d + 1 operands. Every held-out question is a new chain, but its steps are
one-digit facts (a running total plus or minus a digit) that training questions also use, so a model
that reasons step by step can answer questions it never saw: the embedded default's task, where
GRPO's gains on training questions show up on held-out ones.
"""

from __future__ import annotations

import random
from typing import Any

from r1mega.data.tasks import arithmetic, expr


def generate(rng: random.Random, difficulty: int) -> dict[str, Any]:
    tree = rng.randint(0, 9)
    for _ in range(difficulty):
        tree = expr.BinOp(rng.choice("+-"), tree, rng.randint(0, 9))
    text = expr.to_text(tree)
    return {"prompt": f"Compute {text}", "answer": expr.number_text(expr.evaluate(tree)), "expression": text}


worked = arithmetic.worked
