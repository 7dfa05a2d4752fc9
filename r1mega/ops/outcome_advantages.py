"""Advantages beside GRPO's group mean/std (ops.group_advantages) for outcome rewards r [N], one per sample,
samples in groups of G consecutive ones (the prompts' G samples).

    RLOO (Ahmadian et al. 2024), the leave-one-out baseline:
        A_i = r_i - mean_{j in g(i), j != i} r_j = G / (G - 1) * (r_i - mean_g r)

    REINFORCE++ (Hu 2025), the return of the outcome reward (every token of a sample gets r_i, no
    discount) whitened over all valid tokens of the batch, not within the group:
        A_i = (r_i - mu) / sqrt(var + 1e-8),   mu = sum_i n_i r_i / T,
        var = sum_i n_i (r_i - mu)^2 / (T - 1)                 (n_i valid tokens of sample i, T = sum n_i)
    REINFORCE++-baseline: the same whitening of r_i - mean_g r (the group mean removed first).

A sample without valid tokens takes no part in the batch statistics. Computed in fp64, returned as float32.
Deliberately left out: per-token rewards (the returns of a KL penalty spread over tokens) and a discount.
"""

from __future__ import annotations

import torch


def _grouped(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be [N] with N a multiple of group_size={group_size}, got {tuple(rewards.shape)}")
    return rewards.double().view(-1, group_size)  # [N / G, G]


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """A_i = r_i - (mean of the other G - 1 rewards of its group); needs G >= 2."""
    if group_size < 2:
        raise ValueError(f"RLOO needs groups of at least 2 samples, got algo.group_size={group_size}")
    r = _grouped(rewards, group_size)
    others = (r.sum(1, keepdim=True) - r) / (group_size - 1)
    return (r - others).reshape(-1).float()


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, *,
                            group_size: int | None = None) -> torch.Tensor:
    """REINFORCE++'s whitened returns [N] (module docstring); with `group_size`, REINFORCE++-baseline.
    `mask` [N, T]: the valid tokens, which weight the batch mean and variance."""
    r = rewards.double()
    if group_size is not None:
        grouped = _grouped(rewards, group_size)
        r = (grouped - grouped.mean(1, keepdim=True)).reshape(-1)
    n = (mask != 0).sum(1).double()  # [N]
    total = n.sum()
    if total < 2:
        return torch.zeros_like(rewards, dtype=torch.float32)
    mu = (n * r).sum() / total
    var = (n * (r - mu) ** 2).sum() / (total - 1)
    return ((r - mu) / torch.sqrt(var + 1e-8)).float()
