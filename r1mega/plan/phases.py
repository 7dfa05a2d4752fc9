"""Time of each phase of a rollout on one rank: FLOPs and bytes moved from the config, at the cluster's
stated efficiencies (cluster.py), compute and communication added (no overlap assumed).

FLOPs per token, forward: 2 x the active parameters outside the embedding (every matmul: a
multiply-add per weight the token meets), plus attention's 2 x layers x heads x (qk + v) x context
(QK^T and PV over the keys before the token; causal, so a sequence of S tokens averages S/2). The
backward is twice the forward; "full" checkpointing adds one forward, "selective" recomputes only
elementwise work (counted as none). The fused loss runs 4 GEMMs of 2 N H V (linear_grpo_loss.py).

- rollout: prefill of the prompts at the FLOP rate; decode is memory-bound: every step reads the
  engine's weights and the KV cache of its running slots (mean context), at hbm_efficiency; steps =
  max_new_tokens per wave of `slots` sequences. The larger of the FLOP and memory time is taken.
- logprob passes: a no-grad forward of every token (reference when beta > 0; old when off-policy),
  plus FSDP's all-gather of the parameters once per micro-batch.
- training: forward + backward + recompute + loss per token; FSDP gathers the parameters twice
  (forward and backward) and reduce-scatters the gradients once per micro-batch; tensor parallel
  all-reduces [N, H] twice per layer forward and twice backward; expert parallel sends the k copies
  of every token's hidden state to its experts and back in the forward and again in the backward
  (4 all-to-alls of N k H floats, (ep - 1)/ep of it leaving the rank); pipeline parallel idles for
  the bubble: the step takes 1 + (pp - 1) / (v m) times its compute with m micro-batches per
  optimizer step and v stages per rank (1F1B: v = 1; Narayanan et al. 2021 for interleaved).
- weight sync: every rank gathers the full float32 weights (all-gather over the model's meshes)
  and copies them into the engine at HBM speed.

A ring collective moves (n - 1)/n of its buffer per rank (all-gather, reduce-scatter), twice that
for an all-reduce; a group's bandwidth is NVLink's when its ranks lie in one node, else the NIC's.
"""

from __future__ import annotations

from dataclasses import dataclass

from r1mega.models.kv_cache import KVCache
from r1mega.plan.cluster import ClusterConfig
from r1mega.plan.shards import ParamCounts, RankShards
from r1mega.plan.workload import Workload


@dataclass
class PhaseTime:
    phase: str
    flops: float  # per rank
    compute_s: float
    comm_bytes: float  # per rank, leaving it
    comm_s: float
    note: str = ""

    @property
    def seconds(self) -> float:
        return self.compute_s + self.comm_s


def attention_flops(w: Workload, context: float) -> float:
    """Forward attention FLOPs of one token over `context` keys (all layers)."""
    c = w.model
    v = c.v_head_dim if c.is_mla else c.head_dim
    return 2 * c.num_hidden_layers * c.num_attention_heads * (c.qk_head_dim + v) * context


def token_flops(w: Workload, counts: ParamCounts, context: float, tp: int = 1, ep: int = 1) -> float:
    """Forward FLOPs of one token on one rank: tp splits the dense matmuls and attention; the routed
    experts are split only when ep > 1 spans tp (with ep == 1 every tp rank runs them whole)."""
    c = w.model
    routed_active = counts.routed_experts * c.num_experts_per_tok // c.n_routed_experts if c.n_routed_experts else 0
    dense = 2 * (counts.active - counts.embedding - routed_active) + attention_flops(w, context)
    return dense / tp + 2 * routed_active / (tp if ep > 1 else 1)


def _ring(nbytes: float, n: int) -> float:
    return nbytes * (n - 1) / n if n > 1 else 0.0


def extents(w: Workload) -> dict[str, int]:
    """How many consecutive ranks each group spans (dims.py: tp innermost, then cp, dp_shard, ...)."""
    d = w.dims
    return {"tp": d.tp, "ep": d.ep, "fsdp": d.dp_shard * d.cp * d.tp, "dp": d.world_size // d.pp,
            "pp": d.world_size}


def phase_times(w: Workload, shards: RankShards, counts: ParamCounts, cluster: ClusterConfig,
                engine_bytes: int) -> list[PhaseTime]:
    d, c = w.dims, w.model
    flops_rate = cluster.bf16_flops * cluster.mfu
    link = {k: cluster.link(v) for k, v in extents(w).items()}
    layer_share = len(shards.layers) / c.num_hidden_layers  # a pipeline stage computes its layers only
    seqs, prompt, response = w.sequences_per_rank, w.prompt_tokens, w.response_tokens
    tokens = seqs * w.sequence_tokens  # per rank per rollout
    mean_context = w.sequence_tokens / 2
    out = []

    # rollout (the engine runs the whole model on each rank; SGLang splits it over its tp_size)
    engine_split = w.sglang_tp if w.engine == "sglang" else 1
    prefill = seqs * prompt * token_flops(w, counts, prompt / 2) / engine_split
    decode_flops = seqs * response * token_flops(w, counts, prompt + response / 2) / engine_split
    slots = min(w.max_slots, seqs)
    waves = -(-seqs // slots)
    kv_read = slots * KVCache.bytes_per_token(c) * (prompt + response / 2) / engine_split
    memory_s = waves * w.max_new_tokens * (engine_bytes + kv_read) / (cluster.hbm_bandwidth * cluster.hbm_efficiency)
    compute_s = (prefill + decode_flops) / flops_rate
    out.append(PhaseTime("rollout", prefill + decode_flops, max(compute_s, memory_s), 0.0, 0.0,
                         "memory-bound decode" if memory_s > compute_s else "compute-bound"))

    # logprob passes
    fwd = tokens * token_flops(w, counts, mean_context, d.tp, d.ep) * layer_share
    micro = max(1, -(-tokens // w.micro_tokens))
    gathered = sum(shards.units.values()) if d.world_size > 1 and d.fsdp_enabled else 0
    passes = int(w.reference_pass) + int(not w.on_policy)
    gather_bytes = micro * _ring(gathered, d.dp_shard * d.cp)
    out.append(PhaseTime("logprobs", passes * fwd, passes * fwd / flops_rate, passes * gather_bytes,
                         passes * gather_bytes / link["fsdp"], f"{passes} pass(es)"))

    # training (every sample is trained on once per inner epoch: the steps cover the rollout)
    recompute = 1.0 if w.checkpointing == "full" else 0.0
    loss = 4 * 2 * c.hidden_size * c.vocab_size * tokens if shards.last_stage else 0.0
    train_flops = (3 + recompute) * fwd + loss
    moe_layers = sum(1 for i in shards.layers if c.is_moe_layer(i))
    fsdp_bytes = micro * 3 * _ring(gathered, d.dp_shard * d.cp)
    tp_bytes = 4 * len(shards.layers) * 2 * _ring(tokens * c.hidden_size * 4, d.tp)
    # when the ep group spans tp, each tp rank sends only its 1/tp share of the (replicated) rows
    ep_rows = tokens * c.num_experts_per_tok / (d.tp if d.ep > 1 else 1)
    ep_bytes = 4 * moe_layers * _ring(ep_rows * c.hidden_size * 4, d.ep)
    comm_s = fsdp_bytes / link["fsdp"] + tp_bytes / link["tp"] + ep_bytes / link["ep"]
    compute_s = train_flops / flops_rate
    note = f"a2a {ep_bytes / 1e9:.1f} GB" if d.ep > 1 else ""
    if d.pp > 1:
        stretch = (d.pp - 1) / (w.pp_stages_per_rank * w.micro_batches_per_step)
        compute_s *= 1 + stretch
        note += f"; pp bubble {stretch / (1 + stretch):.0%}"
    out.append(PhaseTime("training", train_flops, compute_s, fsdp_bytes + tp_bytes + ep_bytes, comm_s,
                         note.strip("; ")))

    # weight sync
    full = counts.total * 4
    sync_bytes = _ring(full, d.world_size // d.pp if d.world_size > 1 else 1)
    copy_s = full / (cluster.hbm_bandwidth * cluster.hbm_efficiency)
    out.append(PhaseTime("weight sync", 0.0, copy_s, sync_bytes, sync_bytes / min(link["fsdp"], link["dp"])))
    return out
