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

import dataclasses
from dataclasses import dataclass

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


def _response_record(record: torch.Tensor, prompt_len: int, response_len: int) -> torch.Tensor:
    """A sample's record [P + n - 1, L, k] cut to its response's n tokens, the last one NO_RECORD."""
    part = record[prompt_len:prompt_len + response_len]
    missing = part.new_full((response_len - part.shape[0], *record.shape[1:]), NO_RECORD)
    return torch.cat([part, missing])


def response_hidden(model, batch: TokenBatch, device, routing: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Hidden states [S, R, H] that predict each response token, from one packed forward pass in which
    samples with the same prompt share one copy of it (shared_prefix.py). `routing`: per sample, the
    engine's routing record [P + n - 1, L, k], replayed (module docstring)."""
    if not all(batch.prompt_ids):
        raise ValueError("a sample has an empty prompt: its first response token has no position to be predicted at")
    tokens, positions, groups, order = [], [], [], []  # order: the sample of each sequence of the row
    records = []  # the routing record of each run of stored tokens, in row order
    for members in batch.prompt_groups():
        prompt = batch.prompt_ids[members[0]]
        prefix = (len(tokens), len(tokens) + len(prompt))
        tokens += prompt
        positions += range(len(prompt))
        if routing is not None:
            records.append(routing[members[0]][:len(prompt)])
        suffixes = []
        for i in members:
            response = batch.response_ids[i, :int(batch.mask[i].sum())].tolist()
            suffixes.append((len(tokens), len(tokens) + len(response)))
            tokens += response
            positions += range(len(prompt), len(prompt) + len(response))
            if routing is not None:
                records.append(_response_record(routing[i], len(prompt), len(response)))
        groups.append((prefix, suffixes))
        order += members
    shared = SharedPrefixRow.from_groups(groups, len(tokens), device)
    input_ids = torch.tensor(tokens, device=device)[None]
    replay = None if routing is None else Routing(replay=torch.cat(records).to(device))
    hidden = model(input_ids, position_ids=torch.tensor(positions, device=device)[None], shared=shared,
                   routing=replay, return_hidden=True)[0]  # [T, H]
    # Response token j is predicted at sequence position prompt_len + j - 1, found through the row's
    # sequences laid end to end (`expand`); masked columns point at the sequence's last token (any
    # valid index will do, their loss is 0).
    spans = torch.tensor(shared.spans)[torch.argsort(torch.tensor(order))]  # [S, 2], sample order
    prompt_lens = torch.tensor([len(p) for p in batch.prompt_ids])
    columns = torch.arange(batch.response_ids.shape[1])
    at = torch.minimum(prompt_lens[:, None] - 1 + columns, (spans[:, 1] - spans[:, 0] - 1)[:, None]) + spans[:, :1]
    return hidden[shared.expand[at.to(device)]]  # [S, R, H]


def response_logprobs(model, batch: TokenBatch, *, temperature: float, device,
                      routing: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Logprob [S, R] of each response token, differentiable, through the chunked `linear_logprob`;
    `routing` replayed as `response_hidden` does."""
    from r1mega.ops.linear_logprob import linear_logprob

    hidden = response_hidden(model, batch, device, routing)
    s, r, h = hidden.shape
    logp, _ = linear_logprob(hidden.reshape(s * r, h), model.output_weight, batch.response_ids.to(device).reshape(-1),
                             temperature=temperature)
    return logp.view(s, r) * batch.mask.to(device)
