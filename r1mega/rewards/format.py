"""Format rewards: does the completion follow the R1-Zero or the R1 response layout? Score 1 or 0.

The completion is what the model wrote after the prompt's "Assistant:", so it must open the layout
itself (leading whitespace allowed). A trailing end-of-sequence marker (when the text was decoded with
special tokens) is ignored.

- `format_r1_zero`: `<think> ... </think><answer> ... </answer>`: exactly one of each tag, in that
  order, nothing but whitespace outside the two blocks (whitespace between them is allowed).
- `format_r1`: `<think> ... </think>` followed by a non-empty summary: exactly one pair of think tags,
  nothing but whitespace before `<think>`.

A 0 always comes with the first rule broken in `reason`. Deliberately left out: templates that prefill
`<think>` into the prompt (prepend it to the completion before scoring) and any partial credit.
"""

from __future__ import annotations

from typing import Any, Mapping

from r1mega.rewards.registry import RewardOutput, register_reward

THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE = "<think>", "</think>", "<answer>", "</answer>"
_EOS_MARKERS = ("<|endoftext|>", "<|im_end|>", "<|end_of_text|>", "</s>", "<eos>", "<｜end▁of▁sentence｜>")


def strip_eos(text: str) -> str:
    """`text` without trailing end-of-sequence markers and whitespace."""
    text = text.rstrip()
    while text.endswith(_EOS_MARKERS):
        text = text[: -len(next(m for m in _EOS_MARKERS if text.endswith(m)))].rstrip()
    return text


def _count_problem(text: str, tags: tuple[str, ...]) -> str | None:
    for tag in tags:
        n = text.count(tag)
        if n != 1:
            return f"expected exactly one {tag}, found {n}"
    return None


def think_summary(completion: str) -> tuple[str, str] | None:
    """(chain of thought, what follows `</think>`) of a completion with one closed think block, else None."""
    text = strip_eos(completion)
    if text.count(THINK_OPEN) != 1 or text.count(THINK_CLOSE) != 1:
        return None
    before, rest = text.split(THINK_OPEN)
    thought, _, after = rest.partition(THINK_CLOSE)
    if before.strip() or THINK_CLOSE not in rest:
        return None
    return thought, after


@register_reward("format_r1_zero")
def format_r1_zero(completion: str, sample: Mapping[str, Any]) -> RewardOutput:
    text = strip_eos(completion)
    problem = _count_problem(text, (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE))
    if problem:
        return RewardOutput(0.0, problem)
    positions = [text.index(t) for t in (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)]
    if positions != sorted(positions):
        return RewardOutput(0.0, "tags out of order: expected <think> </think> <answer> </answer>")
    outside = {
        "before <think>": text[: positions[0]],
        "between </think> and <answer>": text[positions[1] + len(THINK_CLOSE): positions[2]],
        "after </answer>": text[positions[3] + len(ANSWER_CLOSE):],
    }
    for where, chunk in outside.items():
        if chunk.strip():
            return RewardOutput(0.0, f"text {where}: {chunk.strip()[:40]!r}")
    if not text[positions[2] + len(ANSWER_OPEN): positions[3]].strip():
        return RewardOutput(0.0, "empty <answer>")
    return RewardOutput(1.0)


@register_reward("format_r1")
def format_r1(completion: str, sample: Mapping[str, Any]) -> RewardOutput:
    text = strip_eos(completion)
    problem = _count_problem(text, (THINK_OPEN, THINK_CLOSE))
    if problem:
        return RewardOutput(0.0, problem)
    if text.index(THINK_OPEN) > text.index(THINK_CLOSE):
        return RewardOutput(0.0, "</think> before <think>")
    if text[: text.index(THINK_OPEN)].strip():
        return RewardOutput(0.0, "text before <think>")
    if not text.partition(THINK_CLOSE)[2].strip():
        return RewardOutput(0.0, "no summary after </think>")
    return RewardOutput(1.0)
