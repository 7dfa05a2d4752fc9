"""A packed row in which sequences share a prefix: GRPO's G responses to one prompt read one copy of it.

The row stores each prefix once, followed by the suffix of each sequence that reads it (a group).
Everything in a transformer but attention works token by token, so it runs on the row as stored and
a prompt's tokens pass through the linear layers once instead of G times (the trainer's forward,
backward and reference pass). Attention (`attention.attend_shared_prefix`) runs each prefix once,
causally (as one `segment`, like a lone sequence stored in one piece), then the group's suffixes in
`AttentionBlock`s that gather their queries, and as keys the prefix followed by their own tokens:
- short suffixes: all of them in one batched call, padded to the longest, with a mask that shows each
  query the prefix and its own earlier tokens (the prefix's queries are not recomputed per sequence);
- a group whose mask would exceed `MASK_ELEMENTS`: one causal call per sequence over its whole
  gathered sequence, of which only the suffix rows are kept (no mask, so flash kernels apply and
  memory stays linear in the length).
A prefix token has the same predecessors in every sequence, so the result equals the sequences'
separate forwards; the gradient reaching a prefix token is the sum of what each sequence sends it, as
it would be for separate copies.

`repeats` says how many sequences read each stored token, so that MoE expert-load counts (and the
bias balancing driven by them) are the same as for separate sequences. `expand`, `spans` and
`first_read` lay the sequences end to end, for backends that run whole sequences (megatron).

`SharedPrefixRow.from_lengths` lays a row out (each prefix, then its sequences' suffixes, groups end to
end) and builds its consistent index fields (`from_groups`, which checks the spans); `position_ids`
and `suffix_predictors` answer where each stored token sits in its sequence and which stored token's
output predicts each suffix token, so a trainer never does the layout's index arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

Span = tuple[int, int]  # [start, end) in the stored row

# Most entries an attention block's mask may have; beyond it a group's sequences run one by one. The
# math fallback of SDPA (a mask and GQA on CUDA) materialises scores of this size times the heads.
MASK_ELEMENTS = 1 << 22


@dataclass
class AttentionBlock:
    """Sequences of one group attending in one call, over their prefix (the row's segment `segment`,
    whose keys the sequences share by `expand`) and their own tokens `tokens` [n, C] (indices into the
    stored row, padded with a valid index: padding rows are never collected, padding columns masked).
    mask [n, 1, C, P + C]: True where an own token's query sees a key; None: one sequence whose
    queries are its prefix's and its own, causal (its output rows past the prefix are collected)."""

    segment: int
    tokens: torch.Tensor
    mask: Optional[torch.Tensor]
    output_rows: int  # its queries: n x C with a mask, prefix + own tokens without


@dataclass
class SharedPrefixRow:
    """Built by `from_lengths` or `from_groups`, which keep the fields below consistent with each other."""

    segments: list[Span]  # runs of stored tokens that attend causally within themselves: prefixes, lone sequences
    segment_tokens: Optional[torch.Tensor]  # [sum of their lengths]: their stored tokens, end to end (None: all, in order)
    blocks: list[AttentionBlock]  # the suffixes of groups of several sequences
    collect: torch.Tensor  # [T]: where each stored token's attention output lies (segments', then blocks' rows)
    repeats: torch.Tensor  # [T]: how many sequences read each stored token
    expand: torch.Tensor  # [N]: the stored token at each position of the sequences laid end to end
    spans: list[Span]  # [start, end) of each sequence in that layout
    first_read: torch.Tensor  # [T]: the position in that layout of each stored token's first reader
    prefix_lengths: list[int]  # of each sequence, in that layout

    @classmethod
    def from_lengths(cls, groups: list[tuple[int, list[int]]], device=None) -> "SharedPrefixRow":
        """`groups`: each prefix's length with its sequences' suffix lengths; the row stores each prefix,
        then those suffixes, one group after another."""
        spans, end = [], 0
        for prefix_length, suffix_lengths in groups:
            prefix, end = (end, end + prefix_length), end + prefix_length
            suffixes = []
            for n in suffix_lengths:
                suffixes.append((end, end + n))
                end += n
            spans.append((prefix, suffixes))
        return cls.from_groups(spans, end, device)

    @classmethod
    def from_groups(cls, groups: list[tuple[Span, list[Span]]], num_tokens: int, device=None) -> "SharedPrefixRow":
        """`groups`: each prefix's span with the spans of the suffixes that follow it (possibly empty).
        The spans must cover the `num_tokens` stored tokens exactly once; a prefix must not be empty."""
        owners = torch.zeros(num_tokens, dtype=torch.long)
        for prefix, suffixes in groups:
            if prefix[1] <= prefix[0]:
                raise ValueError(f"prefix {prefix} is empty: its sequences' first tokens would have no keys")
            for start, end in (prefix, *suffixes):
                if not 0 <= start <= end <= num_tokens:
                    raise ValueError(f"span {(start, end)} is outside the row's {num_tokens} tokens")
                owners[start:end] += 1
        if bool((owners == 0).any()):
            raise ValueError(f"stored tokens {(owners == 0).nonzero().flatten().tolist()[:8]} are read by no sequence")
        if bool((owners > 1).any()):
            raise ValueError(f"stored tokens {(owners > 1).nonzero().flatten().tolist()[:8]} lie in several spans")

        segments, blocks, sequences, prefix_lengths = [], [], [], []
        for (ps, pe), suffixes in groups:
            sequences += [list(range(ps, pe)) + list(range(s, e)) for s, e in suffixes]
            prefix_lengths += [pe - ps] * len(suffixes)
            if len(suffixes) == 1 and suffixes[0][0] == pe:  # a lone sequence stored in one piece: plain causal
                segments.append((ps, suffixes[0][1]))
            else:
                segments.append((ps, pe))
                blocks += _blocks(len(segments) - 1, (ps, pe), suffixes, device)
        collect, offset = torch.empty(num_tokens, dtype=torch.long), 0
        for start, end in segments:
            collect[start:end] = torch.arange(offset, offset + end - start)
            offset += end - start
        for block, placements in blocks:
            for (start, end), row in placements:  # stored tokens start..end-1 take the block's output rows row..
                collect[start:end] = torch.arange(offset + row, offset + row + end - start)
            offset += block.output_rows
        lengths = torch.tensor([len(seq) for seq in sequences])
        ends = lengths.cumsum(0).tolist()
        expand = torch.tensor([t for seq in sequences for t in seq], dtype=torch.long)
        first = torch.full((num_tokens,), expand.numel(), dtype=torch.long)
        first_read = first.scatter_reduce_(0, expand, torch.arange(expand.numel()), reduce="amin")
        repeats = torch.bincount(expand, minlength=num_tokens)
        segment_tokens = torch.cat([torch.arange(start, end) for start, end in segments])
        if torch.equal(segment_tokens, torch.arange(num_tokens)):  # no gather needed (SFT: every prompt alone)
            segment_tokens = None
        return cls(segments, None if segment_tokens is None else segment_tokens.to(device), [b for b, _ in blocks],
                   collect.to(device), repeats.to(device), expand.to(device), list(zip([0] + ends[:-1], ends)),
                   first_read.to(device), prefix_lengths)

    def position_ids(self) -> torch.Tensor:
        """[1, T]: each stored token's position in the sequences that read it (the same in all of them)."""
        starts = torch.tensor([start for start, _ in self.spans], device=self.expand.device)
        lengths = torch.tensor([end - start for start, end in self.spans], device=self.expand.device)
        in_sequence = torch.arange(self.expand.numel(), device=self.expand.device) - starts.repeat_interleave(lengths)
        return in_sequence[self.first_read][None]

    def suffix_predictors(self, width: int) -> torch.Tensor:
        """[N, width]: per sequence (in `spans` order), the stored token whose output predicts its suffix's
        token j, the one at sequence position prefix_length + j - 1; columns past the suffix point at the
        sequence's last token (any valid index would do)."""
        spans = torch.tensor(self.spans)  # [N, 2]
        columns = torch.arange(width)
        last = (spans[:, 1] - spans[:, 0] - 1)[:, None]
        at = torch.minimum(torch.tensor(self.prefix_lengths)[:, None] - 1 + columns, last) + spans[:, :1]
        return self.expand[at.to(self.expand.device)]


def _blocks(segment: int, prefix: Span, suffixes: list[Span],
            device=None) -> list[tuple[AttentionBlock, list[tuple[Span, int]]]]:
    """The attention blocks of one group (its prefix the row's segment `segment`), each with where its
    suffixes' tokens find their outputs: (suffix span, first output row of the block that holds them)."""
    ps, pe = prefix
    p = pe - ps
    suffixes = [(s, e) for s, e in suffixes if e > s]  # an empty suffix asks no query
    if not suffixes:
        return []
    widest = max(e - s for s, e in suffixes)
    if len(suffixes) * widest * (p + widest) > MASK_ELEMENTS:  # one causal call per sequence
        return [(AttentionBlock(segment, torch.arange(s, e, device=device)[None], None, p + e - s), [((s, e), p)])
                for s, e in suffixes]
    tokens = torch.full((len(suffixes), widest), pe - 1, dtype=torch.long)
    for i, (s, e) in enumerate(suffixes):
        tokens[i, :e - s] = torch.arange(s, e)
    lengths = torch.tensor([e - s for s, e in suffixes])
    own = torch.arange(p + widest) - p  # a key's position within its suffix, negative in the prefix
    seen = (own <= torch.arange(widest)[:, None]) & (own < lengths[:, None, None])  # [n, C, P + C]
    block = AttentionBlock(segment, tokens.to(device), seen[:, None].to(device), tokens.numel())
    return [(block, [(span, i * widest) for i, span in enumerate(suffixes)])]
