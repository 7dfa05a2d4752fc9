"""Rejection sampling (R1 stage 3): n samples per prompt from a checkpoint, kept only when correct and
readable, written as SFT jsonl with provenance.

A sample is kept when, in this order (the first failed test is the reason it is dropped):
0. `empty`: it holds more than whitespace;
1. `incorrect`: every `*accuracy` reward component gives full marks;
2. `format`: every `format*` component gives full marks (the layout the next model should learn);
3. `mixed_language`: the language-consistency score of its chain of thought is at least
   `min_language_consistency` (the paper drops chains of thought that mix languages);
4. `long_paragraph`: no paragraph (text between blank lines) is longer than `max_paragraph_chars`;
5. `unrequested_code`: no fenced code block (``` or ~~~) unless the question asks for code (it names
   code, a program, a function, a script or a language, contains a fence, or its row has "tests");
6. `duplicate`: its text, whitespace-normalised, is not one already kept for the same prompt;
7. `per_prompt_limit`: at most `max_per_prompt` samples are kept per prompt.

Each kept row is {"prompt" (the bare question), "response", "kind": "reasoning", "answer",
"source_checkpoint", "prompt_id", "sample_index", "rewards": {component: score}}; `mix` adds
non-reasoning rows ("kind": "non_reasoning") in a given share, as the paper adds ~200k to ~600k.

Deliberately left out: the paper's generative judge (DeepSeek-V3 grading answers that rules cannot),
and dropping over-long whole responses (the engine's max_new_tokens bounds them).
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from r1mega.rewards.language import language_consistency
from r1mega.rollout.engine import SamplingParams, raise_refused

_FENCE = re.compile(r"^\s*(```|~~~)", re.MULTILINE)
_CODE_REQUEST = re.compile(r"\b(code|program|programs|function|script|implement|python|c\+\+|java|javascript|"
                           r"rust|sql|bash)\b", re.IGNORECASE)
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")


@dataclass
class RejectionSettings(SamplingParams):
    """`n` samples per prompt, and the filters' thresholds; the model's EOS always stops a response."""

    n: int = 4
    temperature: float = 0.7
    top_p: float = 0.95
    max_new_tokens: int = 32768
    seed: int = 0
    min_language_consistency: float = 0.95
    max_paragraph_chars: int = 2000
    max_per_prompt: int = 2


# ---- filters: each returns the reason a sample is dropped, or None ----------------------------------
def mixed_language(completion: str, row: Mapping[str, Any], threshold: float) -> str | None:
    score = language_consistency(completion, row).score
    return None if score >= threshold else "mixed_language"


def long_paragraph(completion: str, max_chars: int) -> str | None:
    longest = max(len(p.strip()) for p in _PARAGRAPH_BREAK.split(completion))
    return None if longest <= max_chars else "long_paragraph"


def asks_for_code(row: Mapping[str, Any]) -> bool:
    question = str(row.get("question", row.get("prompt", "")))
    return "tests" in row or bool(_FENCE.search(question) or "```" in question or _CODE_REQUEST.search(question))


def unrequested_code(completion: str, row: Mapping[str, Any]) -> str | None:
    return "unrequested_code" if _FENCE.search(completion) and not asks_for_code(row) else None


def normalise(text: str) -> str:
    return " ".join(text.split())


def verdict(completion: str, row: Mapping[str, Any], components: Mapping[str, float],
            settings: RejectionSettings) -> str | None:
    """Why this sample is dropped (filters 0-5 of the module docstring), or None when it passes them."""
    if not completion.strip():
        return "empty"
    if any(score < 1.0 for name, score in components.items() if name.endswith("accuracy")):
        return "incorrect"
    if any(score < 1.0 for name, score in components.items() if name.startswith("format")):
        return "format"
    return (mixed_language(completion, row, settings.min_language_consistency)
            or long_paragraph(completion, settings.max_paragraph_chars)
            or unrequested_code(completion, row))


def select(candidates: Sequence[tuple[str, Mapping[str, float]]], row: Mapping[str, Any],
           settings: RejectionSettings) -> tuple[list[int], Counter]:
    """Indices of one prompt's kept samples, in sample order, and the count of each drop reason.
    `candidates`: (completion, {component: score}) per sample."""
    kept, seen, reasons = [], set(), Counter()
    for i, (completion, components) in enumerate(candidates):
        reason = verdict(completion, row, components, settings)
        if reason is None and normalise(completion) in seen:
            reason = "duplicate"
        if reason is None and len(kept) >= settings.max_per_prompt:
            reason = "per_prompt_limit"
        if reason is None:
            kept.append(i)
            seen.add(normalise(completion))
        else:
            reasons[reason] += 1
    return kept, reasons


def rejection_sample(engine, tokenizer, rows: Sequence[Mapping[str, Any]], scorer, settings: RejectionSettings,
                     *, source: str) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Kept rows (with provenance) and statistics: samples drawn, kept, and dropped per reason."""
    sampling = dataclasses.replace(settings, stop_token_ids=[*settings.stop_token_ids, tokenizer.eos_token_id])
    groups = engine.generate([tokenizer.encode(r["prompt"]) for r in rows], sampling)
    raise_refused(groups, rows)
    texts = [s.text for group in groups for s in group]
    scores = scorer.score(texts, [r for r in rows for _ in range(settings.n)])
    out, dropped = [], Counter()
    for q, row in enumerate(rows):
        candidates = []
        for j in range(settings.n):
            flat = q * settings.n + j
            components = {name: values[flat] for name, values in scores.components.items()}
            candidates.append((texts[flat], components))
        kept, reasons = select(candidates, row, settings)
        dropped.update(reasons)
        for j in kept:
            out.append({"prompt": row.get("question", row["prompt"]), "response": candidates[j][0].strip(),
                        "kind": "reasoning", "answer": row.get("answer"), "source_checkpoint": source,
                        "prompt_id": row.get("id", q), "sample_index": j, "rewards": candidates[j][1]})
    stats = {"rejection/samples": float(len(texts)), "rejection/kept": float(len(out)),
             "rejection/prompts_with_a_kept_sample": float(len({r["prompt_id"] for r in out}))}
    stats.update({f"rejection/dropped_{reason}": float(n) for reason, n in sorted(dropped.items())})
    return out, stats


def mix(reasoning: Sequence[dict[str, Any]], non_reasoning: Sequence[dict[str, Any]], share: float,
        seed: int) -> list[dict[str, Any]]:
    """`reasoning` plus non-reasoning rows making up `share` of the result (drawn with repeats when there
    are too few), shuffled. The paper: ~600k reasoning + ~200k non-reasoning, a share of 0.25."""
    if not 0.0 <= share < 1.0:
        raise ValueError(f"non-reasoning share must be in [0, 1), got {share}")
    rng = random.Random(seed)
    wanted = round(len(reasoning) * share / (1.0 - share))
    extra = [] if not non_reasoning or not wanted else [
        {**dict(non_reasoning[i % len(non_reasoning)]), "kind": "non_reasoning"}
        for i in rng.sample(range(max(wanted, len(non_reasoning))), wanted)]
    rows = [*reasoning, *extra]
    rng.shuffle(rows)
    return rows


def write_jsonl(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Written to a temporary name, then renamed: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    os.replace(tmp, path)
    return path
