"""What one GRPO rollout asks of each rank, read from the r1mega-train config: the model's shape, the
layout, the sequence lengths and token counts (r1mega/trainers/grpo.py is the loop being planned).

A rollout (the trainer's `train_step`): train_batch_size questions x group_size samples generated,
reference (beta > 0) and old (off-policy only) logprob passes over them, inner_epochs x
train_batch_size / ppo_mini_batch_size optimizer steps, then one weight sync. Each data-parallel rank
handles 1/dp of the samples. Sequence lengths are the worst case unless `response_fraction` says
otherwise: prompts of `prompt_tokens`, responses of the schedule's longest max_new_tokens.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from r1mega.models.config import ModelConfig, preset
from r1mega.parallel.dims import ParallelDims
from r1mega.parallel.pipeline import schedule_settings


@dataclass
class Workload:
    model: ModelConfig
    dims: ParallelDims  # the layout (no mesh is built from it)
    checkpointing: str
    prompt_tokens: int
    response_tokens: int  # mean tokens of a response
    max_new_tokens: int  # the schedule's longest
    sequences_per_rank: int  # generated per rollout by one data-parallel rank
    steps: int  # optimizer steps per rollout
    micro_tokens: int  # tokens of one training micro-batch (micro_batch_tokens)
    on_policy: bool  # no separate old-logprob pass
    reference_pass: bool  # beta > 0
    engine: str  # "native" or "sglang"
    max_slots: int
    kv_cache_bytes: int  # 0: slots x the longest sequence
    sglang_tp: int
    sglang_dtype_bytes: int
    sglang_mem_fraction: float
    bucket_bytes: int
    pp_stages_per_rank: int  # pipeline stages each pp rank holds (1: 1F1B; more: interleaved 1F1B)

    @property
    def longest_sequence(self) -> int:
        return self.prompt_tokens + self.max_new_tokens

    @property
    def sequence_tokens(self) -> int:
        return self.prompt_tokens + self.response_tokens

    @property
    def micro_batches_per_step(self) -> int:
        """Micro-batches one rank runs per optimizer step."""
        per_step = self.sequences_per_rank * self.sequence_tokens / max(1, self.steps)
        return max(1, -(-int(per_step) // self.micro_tokens))


def model_config(model_cfg, vocab_size: int = 0) -> ModelConfig:
    """The policy's ModelConfig: config.json of model.path (Hugging Face or native), else the preset."""
    from r1mega.models.checkpoint import is_native, read_native_config

    if model_cfg.path:
        path = Path(model_cfg.path)
        config = (read_native_config(path) if is_native(path)
                  else ModelConfig.from_hf(json.loads((path / "config.json").read_text())))
    else:
        config = preset(model_cfg.preset)
    if vocab_size:
        config = ModelConfig.from_dict({**config.to_dict(), "vocab_size": vocab_size})
    return config


def micro_batch_tokens(token_budget: int, longest: int, sequences_per_step: int) -> int:
    """The largest micro-batch a rank packs: the token budget, but never more than the rank's share of an
    optimizer step's sequences (sharded_batch.micro_batches_per_rank splits a mini-batch's micro-batches over the
    data-parallel ranks, halving one when there are fewer than ranks), and never less than one whole
    longest sequence (a sample is never split)."""
    return max(longest, min(token_budget, sequences_per_step * longest))


def workload(cfg, world: int, plan) -> Workload:
    """From an r1mega Config (`cfg`: model, algo, rollout, parallel) and the plan settings."""
    from r1mega.trainers.policy_update import is_on_policy, steps_per_rollout

    algo, rollout, parallel = cfg.algo, cfg.rollout, cfg.parallel
    dims = ParallelDims.from_config(parallel, world)
    longest = max(value for _, value in rollout.max_new_tokens)
    sequences = algo.train_batch_size * algo.group_size
    if sequences % dims.dp_size:
        raise ValueError(f"train_batch_size x group_size = {sequences} is not a multiple of the data-parallel "
                         f"degree {dims.dp_size}")
    return Workload(
        model=model_config(cfg.model, plan.vocab_size), dims=dims, checkpointing=parallel.activation_checkpointing,
        prompt_tokens=plan.prompt_tokens, response_tokens=max(1, int(longest * plan.response_fraction)),
        max_new_tokens=longest, sequences_per_rank=sequences // dims.dp_size, steps=steps_per_rollout(algo),
        micro_tokens=micro_batch_tokens(algo.token_budget, plan.prompt_tokens + longest,
                                        algo.ppo_mini_batch_size * algo.group_size // dims.dp_size),
        on_policy=is_on_policy(algo),
        reference_pass=algo.beta > 0, engine=rollout.engine, max_slots=rollout.max_slots,
        kv_cache_bytes=rollout.kv_cache_bytes, sglang_tp=rollout.sglang.tp_size,
        sglang_dtype_bytes=2 if rollout.sglang.dtype in ("bfloat16", "float16") else 4,
        sglang_mem_fraction=rollout.sglang.mem_fraction_static, bucket_bytes=rollout.sglang.bucket_bytes,
        pp_stages_per_rank=schedule_settings(parallel, dims.pp)[1])
