"""Prompt + response sequences laid out for the loss, and the packed forward that serves them.

Sample i is `prompt_i + response_i`. Every per-token tensor is [S, R]: S samples, R the longest
response, response tokens left-aligned, `mask` marking real tokens. The logits that predict response
token j of a sample come from the hidden state at sequence position `prompt_len + j - 1`, which is
what `response_hidden` gathers from one packed forward: sequences side by side in one row, attention
kept within each, and the samples of one prompt (GRPO's group) reading a single copy of it, so that
the prompt passes through the model once per micro-batch instead of once per sample. With routing
records (the engine's experts per token, `Sample.routed_experts`), that forward replays them: the
shared prompt takes the record of its group's first sample, each response its own, and a response's
last token, which the engine never fed, routes itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from r1mega.data.packing import pack_sequences
from r1mega.models.routing import NO_RECORD, Routing
from r1mega.models.shared_prefix import SharedPrefixRow


@dataclass
class TokenBatch:
    prompt_ids: list[list[int]]
    response_ids: torch.Tensor  # [S, R] int64, 0 where masked
    mask: torch.Tensor  # [S, R] float32

    @staticmethod
    def pad(responses: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(1, max(len(r) for r in responses))
        ids, mask = torch.zeros(len(responses), width, dtype=torch.long), torch.zeros(len(responses), width)
        for i, response in enumerate(responses):
            ids[i, :len(response)] = torch.tensor(response, dtype=torch.long)
            mask[i, :len(response)] = 1.0
        return ids, mask

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def select(self, index: list[int]):
        """The samples `index` (same class), per-token tensors cut to their own longest response."""
        idx = torch.tensor(index, dtype=torch.long)
        width = max(1, int(self.mask[idx].sum(1).max()))

        def pick(value):
            if isinstance(value, torch.Tensor):
                return value[idx, :width] if value.dim() == 2 else value[idx]
            if isinstance(value, list):
                return [value[i] for i in index]
            return value  # None, or a value of the whole batch (a data-parallel shard's rank)

        return dataclasses.replace(self, **{f.name: pick(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def lengths(self) -> list[int]:
        """Tokens of each sample's sequence (prompt + response)."""
        return [len(self.prompt_ids[i]) + int(self.mask[i].sum()) for i in range(len(self))]

    def micro_batches(self, token_budget: int) -> list[list[int]]:
        """Indices of the samples in each micro-batch: whole sequences (prompt + response tokens, what
        bounds memory: attention gathers the keys of every sequence whole, and megatron runs it whole) packed
        first-fit-decreasing up to the token budget, a prompt's samples kept together as far as they
        fit, so that they share it (`response_hidden`). A sample longer than the budget is alone."""
        lengths = self.lengths()
        units = []  # (samples of one prompt, their tokens)
        for members in self.prompt_groups():
            unit, cost = [], 0
            for i in members:
                if unit and cost + lengths[i] > token_budget:
                    units.append((unit, cost))
                    unit, cost = [], 0
                unit.append(i)
                cost += lengths[i]
            units.append((unit, cost))
        bins = pack_sequences([cost for _, cost in units], token_budget)
        return [[i for u in b for i in units[u][0]] for b in bins]

    def prompt_groups(self) -> list[list[int]]:
        """The samples' indices grouped by identical prompt, groups in order of first appearance."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for i in range(len(self)):
            groups.setdefault(tuple(self.prompt_ids[i]), []).append(i)
        return list(groups.values())


@dataclass
class PackedRow:
    """A micro-batch as the model reads it: one [1, T] row in which the samples of a prompt share one copy
    of it (shared_prefix.py), and where in the row's output lies the hidden state that predicts each
    response token."""

    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    shared: SharedPrefixRow
    predictors: torch.Tensor  # [S, R]: the stored token whose hidden state predicts each response token
    routing: Optional[Routing] = None  # the row's tokens' routing record to replay

    def forward_kwargs(self) -> dict:
        replay = {} if self.routing is None else {"routing": self.routing}
        return {"layout": self.shared, "position_ids": self.position_ids, **replay}

    def select(self, hidden: torch.Tensor) -> torch.Tensor:
        """The row's hidden states [1, T, H] -> those that predict the response tokens [S, R, H]."""
        return hidden[0][self.predictors]


def _response_record(record: torch.Tensor, prompt_len: int, response_len: int) -> torch.Tensor:
    """A sample's record [P + n - 1, L, k] cut to its response's n tokens, the last one NO_RECORD."""
    part = record[prompt_len:prompt_len + response_len]
    missing = part.new_full((response_len - part.shape[0], *record.shape[1:]), NO_RECORD)
    return torch.cat([part, missing])


def packed_row(batch: TokenBatch, device, routing: list[torch.Tensor] | None = None) -> PackedRow:
    """`routing`: per sample, the engine's routing record [P + n - 1, L, k], replayed (module docstring)."""
    if not all(batch.prompt_ids):
        raise ValueError("a sample has an empty prompt: its first response token has no position to be predicted at")
    # the row's layout (shared_prefix.py): each prompt once, then its samples' responses
    tokens, groups, order = [], [], []  # order: the sample of each sequence of the row
    records = []  # the routing record of each run of stored tokens, in row order
    for members in batch.prompt_groups():
        prompt = batch.prompt_ids[members[0]]
        tokens += prompt
        if routing is not None:
            records.append(routing[members[0]][:len(prompt)])
        response_lengths = []
        for i in members:
            response = batch.response_ids[i, :int(batch.mask[i].sum())].tolist()
            tokens += response
            response_lengths.append(len(response))
            if routing is not None:
                records.append(_response_record(routing[i], len(prompt), len(response)))
        groups.append((len(prompt), response_lengths))
        order += members
    shared = SharedPrefixRow.from_lengths(groups, device)
    replay = None if routing is None else Routing(replay=torch.cat(records).to(device))
    sample_order = torch.argsort(torch.tensor(order)).to(device)
    return PackedRow(torch.tensor(tokens, device=device)[None], shared.position_ids(), shared,
                     shared.suffix_predictors(batch.response_ids.shape[1])[sample_order], replay)


def response_hidden(model, batch: TokenBatch, device, routing: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Hidden states [S, R, H] that predict each response token, from one packed forward pass in which
    samples with the same prompt share one copy of it (shared_prefix.py); `routing` as `packed_row`'s."""
    row = packed_row(batch, device, routing)
    return row.select(model(row.input_ids, **row.forward_kwargs(), return_hidden=True))


# head(hidden [S, R, H], output weight [V, H], micro-batch) -> (the loss to differentiate or None, a result)
Head = Callable[[torch.Tensor, torch.Tensor, TokenBatch], tuple[Optional[torch.Tensor], Any]]


def run_micro_batches(model, micro_batches: list[TokenBatch], head: Head, *, device, backward: bool,
                      routings: list | None = None) -> list:
    """Each micro-batch's packed forward, then `head` on the hidden states that predict its response
    tokens (so the output projection happens in the fused loss op, and [T, V] logits never exist), then,
    with `backward`, the backward of the loss it returns. Returns the heads' results in order.

    A pipelined policy (r1mega.parallel.pipeline) runs them through its schedule instead: the head runs
    on the last stage, and its results come back to every rank. A replicated (DDP) policy keeps its
    gradients local until the last micro-batch (parallel/replicate.py); FSDP2 reduces each micro-batch's
    gradients as they come, which a sum gets right as it is. `routings`: each micro-batch's routing
    records to replay (`packed_row`), or None."""
    rows = [packed_row(micro, device, routing)
            for micro, routing in zip(micro_batches, routings or [None] * len(micro_batches))]
    own = getattr(model, "run_micro_batches", None)
    if own is not None:
        heads = [lambda hidden, weight, row=row, micro=micro: head(row.select(hidden), weight, micro)
                 for row, micro in zip(rows, micro_batches)]
        return own([(row.input_ids, row.forward_kwargs()) for row in rows], heads, backward=backward)
    results = []
    for n, (row, micro) in enumerate(zip(rows, micro_batches)):
        no_sync = getattr(model, "no_sync", None)
        keep = backward and no_sync is not None and n < len(rows) - 1
        with no_sync() if keep else contextlib.nullcontext():
            hidden = row.select(model(row.input_ids, **row.forward_kwargs(), return_hidden=True))
            loss, result = head(hidden, model.output_weight, micro)
            if backward:
                loss.backward()
        results.append(result)
    return results


def vocab_group(model):
    """The process group `model.output_weight` is split over by vocabulary (megatron's tensor-parallel
    policy), or None: the whole matrix on every rank (the native model, the reference)."""
    return getattr(model, "vocab_group", None)


def response_logprobs(model, batch: TokenBatch, *, temperature: float, device,
                      routing: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Logprob [S, R] of each response token, differentiable, through the chunked `linear_logprob`;
    `routing` replayed as `response_hidden` does."""
    return logprob_head(response_hidden(model, batch, device, routing), model.output_weight, batch,
                        temperature=temperature, vocab_group=vocab_group(model))


def logprob_head(hidden: torch.Tensor, weight: torch.Tensor, batch: TokenBatch, *, temperature: float,
                 vocab_group=None) -> torch.Tensor:
    """hidden [S, R, H] -> logprob [S, R] of each response token (0 where masked), through the chunked
    `linear_logprob` (vocabulary-parallel over `vocab_group` when the weight is a shard)."""
    from r1mega.ops.linear_logprob import linear_logprob

    s, r, h = hidden.shape
    logp, _ = linear_logprob(hidden.reshape(s * r, h), weight, batch.response_ids.to(hidden.device).reshape(-1),
                             temperature=temperature, process_group=vocab_group)
    return logp.view(s, r) * batch.mask.to(hidden.device)
