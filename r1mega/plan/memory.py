"""The memory of one rank type in each phase of a rollout: a table of named terms (bytes).

Terms, and where each comes from:
- policy parameters, gradients, AdamW states: shards.py (the real parallelize on the meta device).
  Gradients stay allocated between optimizer steps (zero_grad runs at the start of each step), so
  they count in every phase after the first step.
- reference parameters: the reference is the policy's deep copy parallelized the same way
  (grpo.py), so its shards are the policy's parameter shards.
- engine weights: the native engine keeps a whole float32 copy of the model on every rank
  (rollout/native.py: empty_model + update_in_place), counted from a meta build; SGLang keeps
  parameters x its dtype / rollout.sglang.tp_size.
- KV cache: native, slots x the longest sequence x KVCache.bytes_per_token (the engine's own
  sizing; released for training and weight sync, grpo.py); SGLang takes mem_fraction_static of HBM
  for weights and cache during rollout.
- decode logits: [slots, vocab] float32, twice (logits and the sampling's probabilities).
- FSDP gathers: the root unit (embedding, final norm, head: kept gathered through forward and
  backward), the last block (kept gathered for the backward), and three times the largest other
  unit (the one computing, the one prefetched, and its unsharded gradients before reduce-scatter).
- activations: activations.py, at the micro-batch's tokens (workload.micro_batch_tokens: the token
  budget, at most the rank's share of a mini-batch, at least one whole longest sequence). Under
  pipeline parallelism a rank keeps the activations of every forward still waiting for its backward:
  the most the schedule holds at once (pipeline_schedule.most_in_flight, pp - r micro-batches on pp
  rank r for 1F1B), each of one of its stages (1/stages-per-rank of its layers, as stages split evenly).
- weight-sync bucket: gathered_state_dict holds one bucket of full tensors (rollout.sglang.bucket_bytes,
  or one tensor when it is larger) plus that largest tensor's gather buffer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from r1mega.models.kv_cache import KVCache
from r1mega.parallel.pipeline_schedule import most_in_flight
from r1mega.plan import activations
from r1mega.plan.shards import RankShards, ParamCounts
from r1mega.plan.workload import Workload

PHASES = ("rollout", "logprobs", "training", "weight sync")


@dataclass
class MemoryTable:
    rank_type: str
    terms: dict[str, dict[str, int]] = field(default_factory=dict)  # term -> phase -> bytes

    def add(self, term: str, nbytes: int, phases=PHASES) -> None:
        self.terms[term] = {p: int(nbytes) if p in phases else 0 for p in PHASES}

    def total(self, phase: str) -> int:
        return sum(row[phase] for row in self.terms.values())

    def peak_phase(self) -> str:
        return max(PHASES, key=self.total)

    def largest_term(self, phase: str) -> tuple[str, int]:
        return max(((t, row[phase]) for t, row in self.terms.items()), key=lambda x: x[1])


def engine_weight_bytes(w: Workload, counts: ParamCounts) -> int:
    if w.engine == "sglang":
        return counts.total * w.sglang_dtype_bytes // max(1, w.sglang_tp)
    return counts.total * 4  # the native engine's float32 copy (meta build: every parameter)


def kv_cache_bytes(w: Workload) -> int:
    per_slot = KVCache.bytes_per_token(w.model) * w.longest_sequence  # float32, the native engine's dtype
    slots = w.max_slots if not w.kv_cache_bytes else min(w.max_slots, w.kv_cache_bytes // per_slot)
    return slots * per_slot


def fsdp_gather_bytes(shards: RankShards, fsdp: bool) -> int:
    if not fsdp or not shards.units:
        return 0
    units = dict(shards.units)
    root = units.pop("root", 0)
    blocks = [v for k, v in units.items() if not k.endswith("experts")]
    experts = [v for k, v in units.items() if k.endswith("experts")]
    # a block's experts are their own unit, gathered with it
    per_block = sorted((b + (max(experts) if experts else 0) for b in blocks), reverse=True)
    last = per_block[0] if per_block else 0
    return root + last + 3 * (per_block[0] if per_block else 0)


def largest_tensor_bytes(w: Workload) -> int:
    c = w.model
    mats = [c.vocab_size * c.hidden_size]
    if c.n_routed_experts:
        mats.append(c.n_routed_experts * c.moe_intermediate_size * c.hidden_size)
    return 4 * max(mats)


def pipeline_in_flight(w: Workload, shards: RankShards) -> float:
    """Micro-batches' worth of this rank's layer activations kept at once (module docstring); 1 without pp."""
    if w.dims.pp == 1:
        return 1.0
    most = most_in_flight(w.dims.pp, w.pp_stages_per_rank, w.micro_batches_per_step, shards.coords.get("pp", 0))
    return most / w.pp_stages_per_rank


def memory_table(w: Workload, shards: RankShards, counts: ParamCounts, hbm_bytes: int, device: str = "cuda",
                 imbalance: float = 1.0) -> MemoryTable:
    d = w.dims
    name = f"rank {shards.rank} ({', '.join(f'{k}={v}' for k, v in shards.coords.items() if v)})".replace(" ()", "")
    table = MemoryTable(name)
    table.add("policy parameters", shards.params)
    table.add("policy gradients", shards.grads)
    table.add("AdamW states", shards.optimizer)
    table.add("reference parameters", shards.params)
    engine = engine_weight_bytes(w, counts)
    if w.engine == "sglang":
        table.add("engine weights", engine)
        table.add("engine KV cache", max(0, int(w.sglang_mem_fraction * hbm_bytes) - engine), ("rollout",))
    else:
        table.add("engine weights", engine)
        table.add("engine KV cache", kv_cache_bytes(w), ("rollout",))
    slots = w.max_slots
    table.add("decode logits", 2 * slots * w.model.vocab_size * 4, ("rollout",))
    fsdp = d.world_size > 1 and d.fsdp_enabled
    table.add("FSDP gathered units", fsdp_gather_bytes(shards, fsdp), ("logprobs", "training"))
    tp, ep = d.tp, d.ep
    train = activations.training_activations(w.model, shards.layers, w.checkpointing, w.micro_tokens,
                                             w.micro_tokens, tp=tp, ep=ep, last_stage=shards.last_stage,
                                             device=device, imbalance=imbalance, in_flight=pipeline_in_flight(w, shards))
    table.add(f"activations ({w.checkpointing}, {w.micro_tokens} tokens)", train.peak, ("training",))
    table.add("no-grad forward", activations.inference_activations(w.model, w.micro_tokens, tp=tp, device=device),
              ("logprobs",))
    table.add("weight-sync bucket", max(w.bucket_bytes, largest_tensor_bytes(w)) + largest_tensor_bytes(w),
              ("weight sync",))
    return table
