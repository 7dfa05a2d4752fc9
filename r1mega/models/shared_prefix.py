"""A packed row in which sequences share a prefix: GRPO's G responses to one prompt read one copy of it.

The row stores each shared token once. Everything in a transformer but attention works token by
token, so it runs on the row as stored and a prompt's tokens pass through the linear layers once
instead of G times (the trainer's forward, backward and reference pass). Attention gathers each
sequence's tokens into a segment of its own (`expand`, laid end to end), attends causally within
each segment (`spans`), and every stored token takes its output from the first segment that reads it
(`collect`). Since a shared token has the same predecessors in every sequence that reads it, the
result equals the sequences' separate forwards; the gradient reaching a shared token is the sum of
what each sequence sends it, as it would be for separate copies.

`repeats` says how many sequences read each stored token, so that MoE expert-load counts (and the
bias balancing driven by them) are the same as for separate sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SharedPrefixRow:
    expand: torch.Tensor  # [N]: the stored token at each position of the sequences laid end to end
    spans: list[tuple[int, int]]  # [start, end) of each sequence in that layout
    collect: torch.Tensor  # [T]: the layout position whose attention output each stored token takes
    repeats: torch.Tensor  # [T]: how many sequences read each stored token

    @classmethod
    def from_sequences(cls, sequences: list[list[int]], num_tokens: int, device=None) -> "SharedPrefixRow":
        """`sequences`: each sequence's stored-token indices, in order. Every one of the `num_tokens`
        stored tokens must be read by some sequence."""
        expand = torch.tensor([t for seq in sequences for t in seq], dtype=torch.long)
        lengths = [len(seq) for seq in sequences]
        ends = torch.tensor(lengths).cumsum(0).tolist()
        repeats = torch.bincount(expand, minlength=num_tokens)
        if expand.numel() and (expand.min() < 0 or expand.max() >= num_tokens):
            raise ValueError(f"sequence token indices must lie in [0, {num_tokens})")
        if bool((repeats == 0).any()):
            raise ValueError(f"stored tokens {(repeats == 0).nonzero().flatten().tolist()[:8]} are read by no sequence")
        first = torch.full((num_tokens,), expand.numel(), dtype=torch.long)
        collect = first.scatter_reduce_(0, expand, torch.arange(expand.numel()), reduce="amin")
        spans = list(zip([0] + ends[:-1], ends))
        return cls(expand.to(device), spans, collect.to(device), repeats.to(device))
