"""Synthetic verifiable tasks, generated in code from a seed, and demonstrations for a tiny base model.

A sample is a JSON-ready dict: "prompt" (the bare question, no template), "answer" (the ground truth
as a string), "task", "difficulty", plus the task's own fields ("expression" for arithmetic;
"numbers" and "target" for countdown, whose "answer" is one solution among possibly many).

Train and test never share a question: a question belongs to the held-out split when a hash of its
task and text is 0 modulo HELD_OUT_EVERY, whatever the seed, size or difficulty that produced it. Within a split, questions are drawn without repeats while the question
space allows it and with repeats after that (level-1 arithmetic has only 200 questions).

Deliberately left out: the reward (r1mega/rewards checks answers) and prompt templates (templates.py).
"""

from __future__ import annotations

import hashlib
import random
from types import ModuleType
from typing import Any

from r1mega.data.tasks import arithmetic, chain, countdown, strategies

TASKS: dict[str, ModuleType] = {"arithmetic": arithmetic, "chain": chain, "countdown": countdown}
HELD_OUT_EVERY = 10
# Repeats drawn (in all) before a split is taken to be exhausted and repeats are let in.
_PATIENCE = 200


def is_held_out(task: str, prompt: str) -> bool:
    digest = hashlib.sha256(f"{task}\n{prompt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % HELD_OUT_EVERY == 0


def _task(name: str) -> ModuleType:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: expected one of {sorted(TASKS)}")
    return TASKS[name]


def generate(name: str, rng: random.Random, difficulty: int) -> dict[str, Any]:
    """One sample of task `name`, whichever split its question falls in."""
    if difficulty < 1:
        raise ValueError(f"difficulty must be >= 1, got {difficulty}")
    sample = _task(name).generate(rng, difficulty)
    return {"prompt": sample.pop("prompt"), "answer": sample.pop("answer"), "task": name,
            "difficulty": difficulty, **sample}


def make_task_dataset(name: str, split: str = "train", size: int = 1000, difficulty: int = 1,
                      seed: int = 0) -> list[dict[str, Any]]:
    """`size` samples of the split, the same list for the same arguments on any machine."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    rng = random.Random(f"{name}/{split}/{difficulty}/{seed}")  # str seeds are hashed stably (sha512)
    out, seen, repeats = [], set(), 0
    while len(out) < size:
        sample = generate(name, rng, difficulty)
        if is_held_out(name, sample["prompt"]) != (split == "test"):
            continue
        if sample["prompt"] in seen and repeats < _PATIENCE:
            repeats += 1  # never reset: once the space looks exhausted, repeats stay allowed
            continue
        seen.add(sample["prompt"])
        out.append(sample)
    return out


def demonstration(sample: dict[str, Any], rng: random.Random, wrong_rate: float = 0.0,
                  bad_format_rate: float = 0.0, strategy: str | None = None, slip_rate: float = 0.0) -> str:
    """A worked response in the R1-Zero format, `<think> ... </think><answer> ... </answer>`, the text
    that follows the template's "Assistant:" (append the EOS token yourself).

    `strategy` (the `chain` task only): the working written by strategies.py, each operation slipping
    with probability `slip_rate`. Otherwise the task's own worked solution, whose final answer is wrong
    (and the reasoning leads to it) with probability `wrong_rate`. With probability `bad_format_rate` the
    tags are broken (missing answer tags or missing </think>).
    """
    if strategy is not None:
        if sample["task"] != "chain":
            raise ValueError(f"strategy={strategy!r} is for the chain task, not {sample['task']!r}")
        lines, answer = strategies.write(sample, strategy, rng, slip_rate)
    else:
        lines, answer = _task(sample["task"]).worked(sample, rng, rng.random() < wrong_rate)
    thought = " ".join(lines)
    if rng.random() < bad_format_rate:
        if rng.random() < 0.5:
            return f"<think> {thought} </think> The answer is {answer}."
        return f"<think> {thought} <answer> {answer} </answer>"
    return f"<think> {thought} </think><answer> {answer} </answer>"
