"""The rollout buffer of one GRPO step: sampled sequences with rewards, advantages and logprobs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from r1mega.trainers.token_batch import TokenBatch


@dataclass
class RolloutBatch(TokenBatch):
    engine_logp: torch.Tensor  # [S, R] logprobs the engine sampled with
    rewards: torch.Tensor  # [S]
    advantages: torch.Tensor | None = None  # [S], or [S, R] once importance weights multiply them
    old_logp: torch.Tensor | None = None  # [S, R]
    ref_logp: torch.Tensor | None = None  # [S, R]
    routing: list[torch.Tensor] | None = None  # per sample, the engine's routing record (Sample.routed_experts)
    # [S, R] the tokens the loss counts: `mask` less those a rollout-correction mask rejected; None: `mask`.
    # Apart from `mask`, which says where each response lies (packing and the forward read it).
    loss_mask: torch.Tensor | None = None

    def loss_tokens(self) -> torch.Tensor:
        return self.mask if self.loss_mask is None else self.loss_mask

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """`tensor` reduced by `op` ("sum", "min" or "max") over the ranks that share this batch: here one
        process holds it whole, so `tensor` itself (a data-parallel shard reduces, sharded_batch.py)."""
        return tensor

    @classmethod
    def from_samples(cls, samples, rewards: torch.Tensor) -> "RolloutBatch":
        """`samples`: a flat list of engine `Sample`s, group after group."""
        response_ids, mask = cls.pad([list(s.token_ids) for s in samples])
        engine_logp, _ = cls.pad([[0] * len(s.token_ids) for s in samples])
        engine_logp = engine_logp.float()
        for i, sample in enumerate(samples):
            engine_logp[i, :len(sample.logprobs)] = torch.tensor(sample.logprobs, dtype=torch.float32)
        records = [s.routed_experts for s in samples]
        if any(r is None for r in records) and not all(r is None for r in records):
            raise ValueError("some samples carry a routing record and others none: the engine records all or none")
        return cls([list(s.prompt_ids) for s in samples], response_ids, mask, engine_logp, rewards.float(),
                   routing=None if records and records[0] is None else records)
