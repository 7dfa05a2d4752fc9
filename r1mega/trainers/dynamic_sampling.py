"""DAPO's dynamic sampling (Yu et al. 2025): the groups whose rewards are all equal carry no GRPO signal
(every advantage is 0), so they are dropped and more questions are generated until `batch_size` groups
have one, for at most `max_rounds` generation rounds. A batch still short after the last round is
filled with dropped groups (they add only their KL term), so that every rollout makes the same number
of optimizer steps; the metrics say how many were.
"""

from __future__ import annotations

from typing import Callable

import torch


def varied_groups(rewards: torch.Tensor, group_size: int) -> list[int]:
    """Indices of the groups (G consecutive samples each) whose rewards are not all equal."""
    grouped = rewards.view(-1, group_size)
    return [g for g in range(grouped.shape[0]) if bool((grouped[g] != grouped[g, 0]).any())]


def collect_groups(generate: Callable[[int], tuple[list, torch.Tensor]], *, batch_size: int, group_size: int,
                   max_rounds: int) -> tuple[list, dict[str, float]]:
    """Calls `generate(round) -> (groups, rewards [len(groups) * group_size])` (each call `batch_size` new
    questions' groups) until `batch_size` groups with varied rewards are in hand or `max_rounds` calls
    are made; returns `batch_size` groups, the varied ones first in the order generated, and metrics."""
    varied, flat = [], []  # flat: every group generated, for the fill
    rounds = 0
    while len(varied) < batch_size and rounds < max_rounds:
        groups, rewards = generate(rounds)
        rounds += 1
        keep = set(varied_groups(rewards, group_size))
        varied += [g for i, g in enumerate(groups) if i in keep]
        flat += [g for i, g in enumerate(groups) if i not in keep]
    chosen = varied[:batch_size]
    filled = batch_size - len(chosen)
    metrics = {"dynamic_sampling/rounds": float(rounds), "dynamic_sampling/varied_groups": float(len(varied)),
               "dynamic_sampling/filled_groups": float(filled)}
    return chosen + flat[:filled], metrics
