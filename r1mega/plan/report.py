"""A plan: per rank type, the memory table and the phase times, and the verdict; as markdown and JSON.

The verdict is per rank type and phase: a phase fits when its total is within the usable HBM (HBM
less cluster.reserved_bytes). A layout that does not fit names the phase that overflows, by how
much, and its largest term, e.g. "does not fit: training needs 91.2 GiB of 76.3 GiB (largest term:
engine weights, 62.5 GiB)". The step time is the slowest rank type's sum of phases; its largest
phase is named too.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from r1mega.plan import memory, phases
from r1mega.plan.cluster import GiB, ClusterConfig
from r1mega.plan.shards import ParamCounts, param_counts, rank_types
from r1mega.plan.workload import Workload


@dataclass
class RankPlan:
    table: memory.MemoryTable
    times: list[phases.PhaseTime]

    @property
    def seconds(self) -> float:
        return sum(t.seconds for t in self.times)


@dataclass
class Plan:
    workload: Workload
    cluster: ClusterConfig
    counts: ParamCounts
    ranks: list[RankPlan]
    notes: list[str]

    @property
    def fits(self) -> bool:
        usable = self.cluster.usable_bytes
        return all(r.table.total(p) <= usable for r in self.ranks for p in memory.PHASES)

    @property
    def step_seconds(self) -> float:
        return max(r.seconds for r in self.ranks)

    def verdict(self) -> str:
        usable = self.cluster.usable_bytes
        worst = max(((r, p) for r in self.ranks for p in memory.PHASES), key=lambda rp: rp[0].table.total(rp[1]))
        rank, phase = worst
        need = rank.table.total(phase)
        term, size = rank.table.largest_term(phase)
        slow = max(self.ranks, key=lambda r: r.seconds)
        longest = max(slow.times, key=lambda t: t.seconds)
        timing = (f"rollout time {self.step_seconds:,.0f} s, largest phase {longest.phase} "
                  f"({longest.seconds:,.0f} s)")
        if need <= usable:
            return (f"fits: the fullest phase is {phase} on {rank.table.rank_type}, {need / GiB:.1f} of "
                    f"{usable / GiB:.1f} GiB (largest term: {term}, {size / GiB:.1f} GiB); {timing}")
        return (f"does not fit: {phase} on {rank.table.rank_type} needs {need / GiB:.1f} GiB of {usable / GiB:.1f} "
                f"GiB (largest term: {term}, {size / GiB:.1f} GiB); {timing}")


def make_plan(w: Workload, cluster: ClusterConfig, *, imbalance: float = 1.0, shard_cache: dict | None = None) -> Plan:
    d = w.dims
    if d.world_size != cluster.world:
        raise ValueError(f"the layout's world {d.world_size} != cluster nodes x gpus_per_node = {cluster.world}")
    counts = param_counts(w.model)
    key = (d.dp_replicate, d.dp_shard, d.tp, d.ep, d.pp)
    cache = shard_cache if shard_cache is not None else {}
    if key not in cache:
        parallel = dataclasses.replace(_ParallelFields(), dp_replicate=d.dp_replicate, dp_shard=d.dp_shard, tp=d.tp,
                                       ep=d.ep, pp=d.pp)
        cache[key] = rank_types(w.model, parallel, d.world_size)
    engine = memory.engine_weight_bytes(w, counts)
    ranks = [RankPlan(memory.memory_table(w, s, counts, cluster.hbm_bytes, cluster.device, imbalance),
                      phases.phase_times(w, s, counts, cluster, engine)) for s in cache[key]]
    notes = []
    if w.engine == "native" and d.world_size > 1:
        notes.append("the native engine holds the whole float32 model on every rank (rollout.engine=sglang "
                     "splits it over rollout.sglang.tp_size)")
    return Plan(w, cluster, counts, ranks, notes)


@dataclass
class _ParallelFields:
    dp_shard: int = -1
    dp_replicate: int = 1
    tp: int = 1
    ep: int = 1
    pp: int = 1
    activation_checkpointing: str = "none"


def _gib(n: float) -> str:
    return f"{n / GiB:,.2f}"


def layout_name(w: Workload) -> str:
    d = w.dims
    return (f"tp={d.tp} ep={d.ep} pp={d.pp} dp_shard={d.dp_shard} dp_replicate={d.dp_replicate} "
            f"checkpointing={w.checkpointing} micro-batch={w.micro_tokens} tokens")


def markdown(plan: Plan) -> str:
    w, c, n = plan.workload, plan.cluster, plan.counts
    lines = [f"## Plan: {w.model.architecture}, {n.total / 1e9:,.2f}B parameters ({n.active / 1e9:,.2f}B active) "
             f"on {c.nodes} x {c.gpus_per_node} GPUs",
             "", f"Layout: {layout_name(w)}. Rollout: {w.sequences_per_rank} sequences per data-parallel rank of "
             f"{w.prompt_tokens} + {w.max_new_tokens} tokens, {w.steps} optimizer steps, engine {w.engine}.",
             f"HBM {c.hbm_bytes / 1e9:.0f} GB per GPU, {c.reserved_bytes / GiB:.0f} GiB reserved; times at "
             f"{c.mfu:.0%} of {c.bf16_flops / 1e12:.0f} TFLOP/s, {c.comm_efficiency:.0%} of the links, "
             f"{c.hbm_efficiency:.0%} of HBM bandwidth.", ""]
    for r in plan.ranks:
        lines += [f"### {r.table.rank_type}: memory (GiB)", "",
                  "| term | " + " | ".join(memory.PHASES) + " |", "|---|" + "---:|" * len(memory.PHASES)]
        for term, row in r.table.terms.items():
            lines.append(f"| {term} | " + " | ".join(_gib(row[p]) if row[p] else "" for p in memory.PHASES) + " |")
        lines.append("| **total** | " + " | ".join(f"**{_gib(r.table.total(p))}**" for p in memory.PHASES) + " |")
        lines += ["", f"### {r.table.rank_type}: time per rollout", "",
                  "| phase | TFLOP | compute s | sent GB | comm s | total s | note |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for t in r.times:
            lines.append(f"| {t.phase} | {t.flops / 1e12:,.0f} | {t.compute_s:,.1f} | {t.comm_bytes / 1e9:,.1f} | "
                         f"{t.comm_s:,.1f} | {t.seconds:,.1f} | {t.note} |")
        lines.append("")
    lines += [f"**Verdict:** {plan.verdict()}", ""] + [f"- {note}" for note in plan.notes]
    return "\n".join(lines) + "\n"


def to_json(plan: Plan) -> str:
    return json.dumps({
        "layout": layout_name(plan.workload), "fits": plan.fits, "verdict": plan.verdict(),
        "step_seconds": plan.step_seconds, "params_total": plan.counts.total, "params_active": plan.counts.active,
        "ranks": [{"rank_type": r.table.rank_type, "memory": r.table.terms,
                   "totals": {p: r.table.total(p) for p in memory.PHASES},
                   "times": [dataclasses.asdict(t) for t in r.times]} for r in plan.ranks],
        "notes": plan.notes}, indent=2)
