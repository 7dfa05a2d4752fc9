"""DeepSeek-V3's auxiliary-loss-free load balancing, and expert-load metrics.

After each optimizer step, every MoE layer's selection bias moves against its load:
    b_e <- b_e - rate * sign(load_e - mean(load))
so overloaded experts become less likely to be chosen and underloaded ones more. The load is the
number of tokens routed to each expert since the previous update (training-mode forwards; the last
forward's load when there was none). The bias only selects experts, it never weights them, and it
moves outside autograd.

The loads are the MoE layers' own (moe.py counts them; `MoE.pending_load`).

Deliberately left out: summing loads across data-parallel ranks (the trainer's policy sums them before
calling this: `sum_expert_load`, r1mega/parallel/native_policy.py), the sequence-wise auxiliary loss of
the paper.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from r1mega.models.moe import MoE


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


def bias_step(bias: torch.Tensor, load: torch.Tensor, rate: float) -> None:
    """b_e <- b_e - rate * sign(load_e - mean(load)), in place."""
    load = load.float()
    bias -= rate * torch.sign(load - load.mean()).to(device=bias.device, dtype=bias.dtype)


@torch.no_grad()
def update_expert_bias(model: nn.Module, rate: float) -> None:
    """One balancing step for every MoE layer with a selection bias; resets the accumulated loads."""
    for _, moe in moe_layers(model):
        load = moe.take_pending_load()
        if moe.router.expert_bias is not None and load is not None:
            bias_step(moe.router.expert_bias, load, rate)


@torch.no_grad()
def load_stats(loads: Iterable[tuple[str, torch.Tensor | None]]) -> dict[str, float]:
    """Per (layer name, tokens per expert), max/mean expert load (1.0 is perfect balance) and unused
    experts, plus the mean ratio over layers; layers with no load counted are skipped."""
    stats: dict[str, float] = {}
    ratios = []
    for name, load in loads:
        if load is None or load.sum() == 0:
            continue
        load = load.float()
        ratio = float(load.max() / load.mean())
        stats[f"moe/{name}/max_over_mean_load"] = ratio
        stats[f"moe/{name}/unused_experts"] = float((load == 0).sum())
        ratios.append(ratio)
    if ratios:
        stats["moe/max_over_mean_load"] = sum(ratios) / len(ratios)
    return stats


def expert_load_stats(model: nn.Module) -> dict[str, float]:
    """`load_stats` of every MoE layer over the loads counted so far; empty when none has run."""
    return load_stats((name, moe.pending_load()) for name, moe in moe_layers(model))
