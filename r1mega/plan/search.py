"""`--search`: the layouts that fit the cluster, ranked by estimated rollout time.

The space: tp over the divisors of gpus_per_node that the model's heads and inner sizes allow (tensor
parallel stays inside a node); pp over the powers of two up to 16 that divide the rest of the world and
leave every stage a layer (1F1B); ep = tp x a divisor of dp_shard that divides the routed experts (MoE
only); dp_replicate 1 or the node count (HSDP: shard inside a node, replicate across); every
checkpointing mode; micro-batch budgets of the configured token budget and 2x, 4x (never below one
whole longest sequence). Shards are read once per (tp, ep, pp, dp) layout and reused for the modes and
budgets, which do not change them.

Deliberately left out: interleaved pipeline schedules, cp > 1 (the trainer runs no context
parallelism), and layouts that split a node's GPUs between tp groups of different sizes.
"""

from __future__ import annotations

import dataclasses

from r1mega.parallel.dims import ParallelDims
from r1mega.plan.cluster import ClusterConfig
from r1mega.plan.report import Plan, make_plan
from r1mega.plan.workload import Workload


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _tp_ok(w: Workload, tp: int) -> bool:
    c = w.model
    kv = c.num_attention_heads if c.is_mla else c.num_key_value_heads
    return (c.num_attention_heads % tp == 0 and kv % tp == 0 and c.intermediate_size % tp == 0
            and (c.moe_intermediate_size * max(1, c.n_shared_experts)) % tp == 0)


def layouts(w: Workload, cluster: ClusterConfig) -> list[ParallelDims]:
    world, out = cluster.world, []
    replicas = sorted({1, cluster.nodes})
    stages = [p for p in (1, 2, 4, 8, 16) if p <= w.model.num_hidden_layers]
    for tp in (t for t in _divisors(cluster.gpus_per_node) if _tp_ok(w, t)):
        for pp in (p for p in stages if world % (p * tp) == 0):
            for rep in (r for r in replicas if world % (r * tp * pp) == 0):
                dp_shard = world // (rep * tp * pp)
                eps = [1]
                if w.model.n_routed_experts:
                    eps += [tp * m for m in _divisors(dp_shard)
                            if tp * m > 1 and w.model.n_routed_experts % (tp * m) == 0]
                for ep in sorted(set(eps)):
                    out.append(ParallelDims(world, dp_replicate=rep, dp_shard=dp_shard, tp=tp, ep=ep, pp=pp))
    return out


def search(w: Workload, cluster: ClusterConfig, *, imbalance: float = 1.0) -> list[Plan]:
    """Every candidate's plan, those that fit first, each group by rollout time."""
    cache: dict = {}
    plans = []
    budgets = sorted({max(w.micro_tokens, w.longest_sequence) * f for f in (1, 2, 4)})
    for dims in layouts(w, cluster):
        if w.sequences_per_rank * w.dims.dp_size % dims.dp_size:
            continue
        sequences = w.sequences_per_rank * w.dims.dp_size // dims.dp_size
        for mode in ("none", "selective", "full"):
            for budget in budgets:
                cand = dataclasses.replace(w, dims=dims, checkpointing=mode, micro_tokens=budget,
                                           sequences_per_rank=sequences, pp_stages_per_rank=1)
                plans.append(make_plan(cand, cluster, imbalance=imbalance, shard_cache=cache))
    return sorted(plans, key=lambda p: (not p.fits, p.step_seconds))
