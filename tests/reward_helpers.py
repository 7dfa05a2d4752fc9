"""Rewards for tests: ones that misbehave, for the scoring-pool tests (the pool's workers import this
module by name), and an easy one a random tiny model can climb, for the trainer tests."""

from __future__ import annotations

import os
import time

from r1mega.rewards import RewardOutput, register_reward


@register_reward("test_digit_share")
def digit_share(completion, sample):
    """The share of the completion's characters that are digits."""
    return RewardOutput(sum(c.isdigit() for c in completion) / max(1, len(completion)))


@register_reward("test_length")
def length_reward(completion, sample):
    return RewardOutput(float(len(completion)))


@register_reward("test_raises")
def raises(completion, sample):
    if completion == "raise":
        raise RuntimeError("boom")
    return RewardOutput(1.0)


@register_reward("test_hangs")
def hangs(completion, sample):
    if completion == "hang":
        time.sleep(3600)
    return RewardOutput(1.0)


@register_reward("test_exits")
def exits(completion, sample):
    if completion == "exit":
        os._exit(3)
    return RewardOutput(1.0)
