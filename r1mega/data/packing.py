"""Sequence packing: whole sequences laid side by side in one row per micro-batch, up to a token budget.

Bins are filled first-fit-decreasing (longest first, each into the first micro-batch with room); a
sequence longer than the budget gets a micro-batch of its own. A packed micro-batch is one row:

    input_ids    [1, T]  the sequences' tokens back to back, then padding (`pad_id`) up to T
    position_ids [1, T]  0, 1, ... restarting at each sequence; 0 on padding
    segment_ids  [1, T]  s for the s-th sequence of the row (0, 1, ...); -1 on padding
    index        [k]     the original position of the row's s-th sequence

The model keeps attention within a segment (padding attends only to padding), so a packed forward
equals the sequences' separate forwards. `unpack` cuts a per-token tensor of a row back into
sequences; `gather` lays per-sequence values (masks, old logprobs, advantages) out like the row.

Deliberately left out: several padded rows per micro-batch ([R, T]); pack into one row per
micro-batch and call the model once per micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch


def pack_sequences(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Indices of the sequences in each micro-batch, first-fit-decreasing under `token_budget`.

    Every index appears exactly once; a micro-batch's lengths sum to at most the budget unless it
    holds one sequence longer than the budget, alone. Deterministic: ties keep the input order."""
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    bins: list[list[int]] = []
    room: list[int] = []  # tokens left in each bin
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[i]
        if length < 0:
            raise ValueError(f"sequence {i} has negative length {length}")
        target = next((b for b, left in enumerate(room) if left >= length), None) if length <= token_budget else None
        if target is None:
            bins.append([i])
            room.append(max(0, token_budget - length))
        else:
            bins[target].append(i)
            room[target] -= length
    return bins


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [1, T] int64
    position_ids: torch.Tensor  # [1, T] int64
    segment_ids: torch.Tensor  # [1, T] int64, -1 on padding
    index: list[int]  # original index of segment s
    offsets: list[int]  # start of segment s in the row
    lengths: list[int]  # length of segment s

    @property
    def cu_seqlens(self) -> torch.Tensor:
        """[k + 1] int32 cumulative lengths, as variable-length flash attention takes them."""
        return torch.tensor([0, *torch.tensor(self.lengths).cumsum(0).tolist()], dtype=torch.int32)

    @property
    def max_seqlen(self) -> int:
        return max(self.lengths, default=0)


def pack(sequences: Sequence[Sequence[int]], token_budget: int, pad_id: int = 0,
         pad_to_multiple_of: int = 1) -> list[PackedBatch]:
    """Pack token sequences into micro-batches (see `pack_sequences`); T is padded up to a multiple of
    `pad_to_multiple_of` (e.g. 8 or 128 for tensor cores / sequence parallel)."""
    out = []
    for index in pack_sequences([len(s) for s in sequences], token_budget):
        lengths = [len(sequences[i]) for i in index]
        used = sum(lengths)
        width = max(1, -(-used // pad_to_multiple_of) * pad_to_multiple_of)
        input_ids = torch.full((1, width), pad_id, dtype=torch.long)
        position_ids = torch.zeros((1, width), dtype=torch.long)
        segment_ids = torch.full((1, width), -1, dtype=torch.long)
        offsets, start = [], 0
        for s, (i, length) in enumerate(zip(index, lengths)):
            input_ids[0, start:start + length] = torch.as_tensor(list(sequences[i]), dtype=torch.long)
            position_ids[0, start:start + length] = torch.arange(length)
            segment_ids[0, start:start + length] = s
            offsets.append(start)
            start += length
        out.append(PackedBatch(input_ids, position_ids, segment_ids, index, offsets, lengths))
    return out


def unpack(values: torch.Tensor, batch: PackedBatch) -> list[torch.Tensor]:
    """Per-token `values` of one row, [1, T, ...] or [T, ...], cut into the row's sequences (views),
    in the row's order: piece s belongs to original sequence `batch.index[s]`."""
    width = batch.input_ids.shape[1]
    row = values[0] if values.dim() >= 2 and values.shape[0] == 1 and values.shape[1] == width else values
    if row.shape[0] != width:
        raise ValueError(f"values have {row.shape[0]} positions, the packed row {width}")
    return [row[o:o + n] for o, n in zip(batch.offsets, batch.lengths)]


def unpack_batches(values: Sequence[torch.Tensor], batches: Sequence[PackedBatch]) -> list[torch.Tensor]:
    """Per-token tensors of every micro-batch back to one tensor per original sequence, in the
    original order."""
    count = sum(len(b.index) for b in batches)
    out: list = [None] * count
    for row_values, batch in zip(values, batches, strict=True):
        for i, piece in zip(batch.index, unpack(row_values, batch)):
            out[i] = piece
    return out


def gather(per_sequence: Sequence[torch.Tensor], batch: PackedBatch, pad_value: float = 0) -> torch.Tensor:
    """[1, T, ...]: per-token values of the original sequences (`per_sequence[i]`, [len_i, ...]) laid
    out like the packed row, `pad_value` on padding."""
    first = torch.as_tensor(per_sequence[batch.index[0]])
    out = torch.full((1, batch.input_ids.shape[1], *first.shape[1:]), pad_value, dtype=first.dtype,
                     device=first.device)
    for i, offset, length in zip(batch.index, batch.offsets, batch.lengths):
        piece = torch.as_tensor(per_sequence[i], device=first.device)
        if piece.shape[0] != length:
            raise ValueError(f"sequence {i} has {length} tokens but its values have {piece.shape[0]}")
        out[0, offset:offset + length] = piece
    return out
