"""Partial rollouts: generation in segments of at most `segment` new tokens per sample, with questions kept
in flight beyond the batch, so that a long generation does not hold a batch up: a batch is the first
`batch_size` questions (oldest first) whose G samples have all finished, and the others stay in the pool,
to be continued by the next generation, with the weights the engine holds then.

A continued sample is generated from its prompt plus the tokens it has (one request with n = 1), and
every token keeps the logprob and the engine weight version it was sampled with, so a sample carried
over a weight update holds logprobs of two policies: what rollout correction (algo.correction) weighs.
A fresh question's first segment is one request with n = G and the rollout's seed, as without partial
rollouts; a continuation draws from the rollout's seed, its segment and its sample index.

Deliberately left out: the engine's KV cache kept across segments (a continuation prefills its prompt and
tokens again), stop strings that span a segment boundary.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

from r1mega.rollout.engine import Sample, SamplingParams, raise_refused
from r1mega.rollout.stop import StopChecker, validate_stop


@dataclass
class Question:
    """One question's G samples in flight."""

    row: Mapping[str, Any]
    prompt: list[int]
    tokens: list[list[int]]
    logprobs: list[list[float]]
    versions: list[list[int]]  # the engine version each token was sampled with
    reasons: list[str | None]  # finish reason of each finished sample, None while it runs

    @classmethod
    def fresh(cls, row, prompt: list[int], group_size: int) -> "Question":
        return cls(row, list(prompt), [[] for _ in range(group_size)], [[] for _ in range(group_size)],
                   [[] for _ in range(group_size)], [None] * group_size)

    @property
    def done(self) -> bool:
        return all(reason is not None for reason in self.reasons)


@dataclass
class PartialRollouts:
    engine: Any
    tokenizer: Any
    batch_size: int  # this rank's questions a batch
    extra: int  # this rank's questions kept in flight beyond the batch
    segment: int  # new tokens per sample and generation at most
    pool: list[Question] = field(default_factory=list)

    def need(self) -> int:
        """Questions to add before the next generation."""
        return self.batch_size + self.extra - len(self.pool)

    def add(self, rows, prompts, group_size: int) -> None:
        self.pool += [Question.fresh(row, prompt, group_size) for row, prompt in zip(rows, prompts)]

    def run(self, sampling: SamplingParams) -> tuple[list[list[Sample]], list[Mapping], dict[str, float]]:
        """Segments until `batch_size` questions are done: (their samples, their rows, metrics); the rest stay."""
        segments = 0
        while sum(q.done for q in self.pool) < self.batch_size:
            self._advance(sampling, segments)
            segments += 1
        batch = [q for q in self.pool if q.done][:self.batch_size]
        self.pool = [q for q in self.pool if not any(q is b for b in batch)]
        stop = StopChecker(*validate_stop(sampling.stop_token_ids, sampling.stop), self.tokenizer)
        groups = [[Sample(prompt_ids=q.prompt, token_ids=t, text=stop.finalize(t), logprobs=lp, finish_reason=r)
                   for t, lp, r in zip(q.tokens, q.logprobs, q.reasons)] for q in batch]
        spanning = sum(len(set(v)) > 1 for q in batch for v in q.versions)
        # counts, which add up over data-parallel ranks
        metrics = {"partial/segments": float(segments), "partial/carried": float(len(self.pool)),
                   "partial/multi_version_samples": float(spanning)}
        return groups, [q.row for q in batch], metrics

    def _advance(self, sampling: SamplingParams, segment_index: int) -> None:
        requests = []  # (question, sample index or None for all G, prompt, params)
        for q in self.pool:
            if not any(q.tokens):  # fresh: as one request of n = G, the rollout's own seed
                budget = min(self.segment, sampling.max_new_tokens)
                requests.append((q, None, q.prompt, dataclasses.replace(sampling, max_new_tokens=budget)))
                continue
            for j, reason in enumerate(q.reasons):
                if reason is None:
                    budget = min(self.segment, sampling.max_new_tokens - len(q.tokens[j]))
                    seed = sampling.seed + (segment_index << 32) + j if sampling.seed is not None else None
                    requests.append((q, j, q.prompt + q.tokens[j],
                                     dataclasses.replace(sampling, n=1, max_new_tokens=budget, seed=seed)))
        version = self.engine.version
        outputs = self.engine.generate([prompt for _, _, prompt, _ in requests], [p for *_, p in requests])
        raise_refused(outputs, [q.row for q, *_ in requests])
        for (q, j, _, _), samples in zip(requests, outputs):
            for k, sample in zip(range(len(q.tokens)) if j is None else [j], samples):
                q.tokens[k] += sample.token_ids
                q.logprobs[k] += sample.logprobs
                q.versions[k] += [version] * len(sample.token_ids)
                if sample.finish_reason != "length" or len(q.tokens[k]) >= sampling.max_new_tokens:
                    q.reasons[k] = sample.finish_reason

    def state_dict(self) -> dict[str, Any]:
        return {"pool": list(self.pool)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.pool = list(state["pool"])
