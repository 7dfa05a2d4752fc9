"""Schedules that depend only on the step: learning rate and maximum response length."""

from __future__ import annotations

import math


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, kind: str) -> float:
    """Multiplier of the base learning rate at `step`: linear warm-up, then constant or cosine to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    raise ValueError(f"unknown learning-rate schedule {kind!r} (expected 'constant' or 'cosine')")


def value_at(schedule: list[list[int]], step: int) -> int:
    """The value in force at `step` for a [[from_step, value], ...] schedule (R1: 32k, 64k from 8.2k)."""
    if not schedule:
        raise ValueError("empty schedule")
    points = sorted((int(start), int(value)) for start, value in schedule)
    if points[0][0] > 0:
        raise ValueError(f"schedule {schedule} must start at step 0")
    current = points[0][1]
    for start, value in points:
        if step >= start:
            current = value
    return current
