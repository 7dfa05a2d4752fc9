"""Prompt + response sequences laid out for the loss, and the packed forward that serves them.

Sample i is `prompt_i + response_i`. Every per-token tensor is [S, R]: S samples, R the longest
response, response tokens left-aligned, `mask` marking real tokens. The logits that predict response
token j of a sample come from the hidden state at sequence position `prompt_len + j - 1`, which is
what `response_hidden` gathers from one packed forward (sequences side by side in one row, attention
kept within each).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from r1mega.data.packing import pack_sequences


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

    def sequence(self, i: int) -> list[int]:
        return self.prompt_ids[i] + self.response_ids[i, :int(self.mask[i].sum())].tolist()

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
        """Indices of the samples in each micro-batch: whole sequences packed up to the token budget."""
        return pack_sequences(self.lengths(), token_budget)


def response_hidden(model, batch: TokenBatch, device) -> torch.Tensor:
    """Hidden states [S, R, H] that predict each response token, from one packed forward pass."""
    sequences = [batch.sequence(i) for i in range(len(batch))]
    lengths = torch.tensor([len(seq) for seq in sequences], device=device)
    input_ids = torch.tensor([tok for seq in sequences for tok in seq], device=device)[None]  # [1, sum len]
    segment_ids = torch.repeat_interleave(torch.arange(len(sequences), device=device), lengths)[None]
    hidden = model(input_ids, segment_ids=segment_ids, return_hidden=True)[0]  # [sum len, H]
    starts = lengths.cumsum(0) - lengths
    prompt_lens = torch.tensor([len(p) for p in batch.prompt_ids], device=device)
    positions = (starts + prompt_lens - 1)[:, None] + torch.arange(batch.response_ids.shape[1], device=device)[None]
    # Masked columns point at the sequence's last token: any valid index will do, their loss is 0.
    positions = torch.minimum(positions, (starts + lengths - 1)[:, None])
    return hidden[positions]  # [S, R, H]


def response_logprobs(model, batch: TokenBatch, *, temperature: float, device) -> torch.Tensor:
    """Logprob [S, R] of each response token, differentiable, through the chunked `linear_logprob`."""
    from r1mega.ops.linear_logprob import linear_logprob

    hidden = response_hidden(model, batch, device)
    s, r, h = hidden.shape
    logp, _ = linear_logprob(hidden.reshape(s * r, h), model.output_weight, batch.response_ids.to(device).reshape(-1),
                             temperature=temperature)
    return logp.view(s, r) * batch.mask.to(device)
