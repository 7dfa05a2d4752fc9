"""The reflective words whose rise the paper reports after step ~8,000 of R1-Zero (R1_SPEC.md,
Evaluation), and their whole-word count in a response."""

from __future__ import annotations

import re

REFLECTIVE_WORDS = ("wait", "mistake", "however", "but", "retry", "error", "verify", "wrong", "evaluate", "check")
_REFLECTIVE = re.compile(r"\b(" + "|".join(REFLECTIVE_WORDS) + r")\b", re.IGNORECASE)


def reflective_word_count(text: str) -> int:
    return len(_REFLECTIVE.findall(text))
