"""Causal self-attention: grouped-query (Llama, Qwen2, Qwen3) and multi-head latent (DeepSeek-V3).

Both projections end in `attend`, which takes one of three paths, chosen by the `AttnContext` that
`Transformer.forward` builds once per call with a named constructor; the two training paths go through
`torch.nn.functional.scaled_dot_product_attention` and build no [T, T] mask, so memory stays linear in T:
- `AttnContext.causal`: one causal SDPA call over the whole batch;
- `AttnContext.packed` (`Segments`): one causal SDPA call per contiguous segment of each row, so
  attention stays within a segment; `AttnContext.shared_prefix` (`SharedPrefixRow`), packed with shared
  prefixes: each prefix once, then blocks of its sequences gathered over it and their own tokens
  (`attend_shared_prefix`);
- `AttnContext.cached` (`CacheSlots`, `attend_cached`): this call's keys and values are written at their
  positions, then the queries attend over their slot's cache up to their own position (prefill and
  decode alike), with plain matmuls on the cache's views. MLA caches only its normed latent and rope
  key and attends in the latent space ("weight absorption", as DeepSeek-V3's inference does): the
  query's no-rope part is mapped through each head's key up-projection, the attention-weighted
  latent through its value up-projection; the same numbers as expanding keys and values, in a cache
  (kv_lora_rank + rope_dim per token) 2 x heads x head_dim / that smaller.

Deliberately left out: dropout, sliding windows, and a varlen kernel for the packed path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from r1mega.models import rope
from r1mega.models.kv_cache import KVCache, Slots
from r1mega.models.norm import RMSNorm
from r1mega.models.routing import Routing
from r1mega.models.shared_prefix import SharedPrefixRow


Spans = list[list[tuple[int, int]]]  # per row, [start, end) of each packed segment


@dataclass(frozen=True)
class Segments:
    """A `Transformer.forward` layout: packed rows, each run of equal ids [B, T] attending only within itself."""

    ids: torch.Tensor


@dataclass(frozen=True)
class CacheSlots:
    """A `Transformer.forward` layout: keys and values written to and read from `cache`'s rows `slots`
    (a slice, or [B] row indices)."""

    cache: KVCache
    slots: Slots


# What `Transformer.forward` is told about its rows; None: plain causal
Layout = Optional[Union[Segments, SharedPrefixRow, CacheSlots]]


@dataclass
class CachedAttn:
    """The cached path's view of one call: where its keys and values go and which it reads."""

    cache: KVCache
    slots: Slots
    rows: torch.Tensor  # [B, T]: the slot of each position (KVCache.rows)
    positions: torch.Tensor  # [B, T]
    length: int  # keys read from each slot: max position + 1
    past: torch.Tensor  # [B, T, length]: True past each query's position (stale or unwritten), masked out


@dataclass
class AttnContext:
    """What every layer's attention needs about this forward call, computed once by the Transformer with
    one of the named constructors; `path` holds only what its path needs (None: plain causal)."""

    cos: torch.Tensor  # [B, T, rope_dim/2]
    sin: torch.Tensor
    path: Union[None, Spans, SharedPrefixRow, CachedAttn] = None
    routing: Optional[Routing] = None  # the MoE layers' record and replay of this call (routing.py), not attention's

    @classmethod
    def causal(cls, cos: torch.Tensor, sin: torch.Tensor, routing: Optional[Routing] = None) -> "AttnContext":
        return cls(cos, sin, None, routing)

    @classmethod
    def packed(cls, cos: torch.Tensor, sin: torch.Tensor, spans: Spans,
               routing: Optional[Routing] = None) -> "AttnContext":
        return cls(cos, sin, spans, routing)

    @classmethod
    def shared_prefix(cls, cos: torch.Tensor, sin: torch.Tensor, row: SharedPrefixRow,
                      routing: Optional[Routing] = None) -> "AttnContext":
        return cls(cos, sin, row, routing)

    @classmethod
    def cached(cls, cos: torch.Tensor, sin: torch.Tensor, slots: CacheSlots, positions: torch.Tensor,
               routing: Optional[Routing] = None) -> "AttnContext":
        """positions [B, T]: where this call's keys and values are written in each slot."""
        length = int(positions.max()) + 1
        past = torch.arange(length, device=positions.device) > positions[..., None]
        view = CachedAttn(slots.cache, slots.slots, slots.cache.rows(slots.slots, positions, length), positions,
                          length, past)
        return cls(cos, sin, view, routing)

    @property
    def token_repeats(self) -> Optional[torch.Tensor]:
        """[T]: how many sequences read each stored token of a shared-prefix row; None: each token once."""
        return self.path.repeats if isinstance(self.path, SharedPrefixRow) else None


def attend_cached(layer: int, q: torch.Tensor, k: torch.Tensor, v: Optional[torch.Tensor], scale: float,
                  view: CachedAttn) -> torch.Tensor:
    """Writes k [B, T, Hkv, Dk] and v [B, T, Hkv, Dv] (None when the cache keeps values inside the keys)
    at their positions, then q [B, T, H, Dk] attends over its slot's cache -> [B, T, H, Dv].

    Plain matmuls rather than SDPA: the cache's views go to matmul without a copy, each kv head serves
    its G = H / Hkv queries in one product, and the mask is the [B, T, L] one built once per forward.
    The scores are [B, H, T, L]: small for decode, T x L per head for a chunk of prefill."""
    view.cache.write(layer, view.rows, view.positions, k, v)
    keys, values = view.cache.read(layer, view.slots, view.length)  # [B, Hkv, L, D]
    b, t, h, _ = q.shape
    kv_heads, length = keys.shape[1], keys.shape[2]
    g = h // kv_heads
    q = q.view(b, t, kv_heads, g, -1).permute(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, -1)
    scores = torch.matmul(q, keys.to(q.dtype).transpose(-1, -2)).mul_(scale)  # [B, Hkv, G*T, L]
    scores = scores.view(b, kv_heads, g, t, length).masked_fill_(view.past[:, None, None], float("-inf"))
    probs = scores.view(b, kv_heads, g * t, length).softmax(dim=-1)
    out = torch.matmul(probs, values.to(q.dtype))  # [B, Hkv, G*T, Dv]
    return out.view(b, kv_heads, g, t, -1).permute(0, 3, 1, 2, 4).reshape(b, t, h, -1)


def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, ctx: AttnContext) -> torch.Tensor:
    """q [B, T, H, Dk], k [B, T, Hkv, Dk], v [B, T, Hkv, Dv] -> [B, T, H, Dv]."""
    if isinstance(ctx.path, CachedAttn):
        return attend_cached(layer, q, k, v, scale, ctx.path)
    gqa = q.shape[2] != k.shape[2]
    v_dim = v.shape[-1]
    if v_dim < q.shape[-1]:
        # MLA has Dv < Dk: SDPA's flash kernel needs equal head dims and its fallback takes O(T^2)
        # memory, so v is padded with zeros and the padded output columns dropped.
        return attend(layer, q, k, F.pad(v, (0, q.shape[-1] - v_dim)), scale, ctx)[..., :v_dim]
    if isinstance(ctx.path, SharedPrefixRow):
        return attend_shared_prefix(q, k, v, scale, ctx.path)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
    if ctx.path is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2)
    rows = []
    for b, spans in enumerate(ctx.path):  # spans cover the row, so split (one cat backward, not a slice each)
        lengths = [e - s for s, e in spans]
        rows.append(torch.cat([
            F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale, enable_gqa=gqa)
            for qs, ks, vs in zip(*(x[b:b + 1].split(lengths, dim=2) for x in (q, k, v)))], dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2)


def attend_shared_prefix(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                         row: SharedPrefixRow) -> torch.Tensor:
    """q [1, T, H, Dk], k [1, T, Hkv, Dk], v [1, T, Hkv, Dv] of a shared-prefix row -> [1, T, H, Dv]: each
    segment (a prefix, or a lone sequence) attends causally within itself, then the blocks of the
    prefixes' sequences (shared_prefix.py) over their prefix and own tokens; every stored token takes
    its output from where `row.collect` says."""
    gqa = q.shape[2] != k.shape[2]
    q, k, v = q[0], k[0], v[0]  # [T, heads, D]
    lengths = [end - start for start, end in row.segments]
    # one gather and a split, not a slice per segment (each slice's backward would allocate a whole row)
    gathered = (q, k, v) if row.segment_tokens is None else (x[row.segment_tokens] for x in (q, k, v))
    segments = list(zip(*(x.transpose(0, 1).split(lengths, dim=1) for x in gathered)))  # [heads, L, D] each
    out = torch.cat([F.scaled_dot_product_attention(qs[None], ks[None], vs[None], is_causal=True, scale=scale,
                                                    enable_gqa=gqa)[0] for qs, ks, vs in segments], dim=1)
    if row.segment_tokens is None:  # the segments tile the row (so there are no blocks): outputs in place
        return out.transpose(0, 1)[None]
    parts = [out.transpose(0, 1)]  # [sum of segment lengths, H, Dv]
    for block in row.blocks:
        n = block.tokens.shape[0]
        # the prefix's keys and values are shared by expand (its backward sums the sequences' gradients
        # in one fixed order, unlike a gather with repeated indices), the own tokens gathered
        prefix_q, prefix_k, prefix_v = (x[None].expand(n, *x.shape) for x in segments[block.segment])
        own_q, own_k, own_v = (x[block.tokens].transpose(1, 2) for x in (q, k, v))  # [n, heads, C, D]
        keys, values = torch.cat([prefix_k, own_k], dim=2), torch.cat([prefix_v, own_v], dim=2)
        queries = own_q if block.mask is not None else torch.cat([prefix_q, own_q], dim=2)
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=block.mask, is_causal=block.mask is None,
                                             scale=scale, enable_gqa=gqa)  # [n, H, rows, Dv]
        parts.append(out.transpose(1, 2).flatten(0, 1))
    return torch.cat(parts)[row.collect][None]


class GQAttention(nn.Module):
    """Grouped-query attention; optional q/k/v bias (Qwen2), output bias, per-head q/k RMSNorm (Qwen3)."""

    def __init__(self, config, layer: int):
        super().__init__()
        self.layer, self.config = layer, config
        self.n_heads, self.n_kv, self.head_dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        h = config.hidden_size
        self.wq = nn.Linear(h, self.n_heads * self.head_dim, bias=config.attention_bias)
        self.wk = nn.Linear(h, self.n_kv * self.head_dim, bias=config.attention_bias)
        self.wv = nn.Linear(h, self.n_kv * self.head_dim, bias=config.attention_bias)
        self.wo = nn.Linear(self.n_heads * self.head_dim, h, bias=config.attention_out_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.scale = rope.softmax_scale(config)

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.wq(x).view(b, t, -1, self.head_dim)  # -1: the local heads under tensor parallel
        k = self.wk(x).view(b, t, -1, self.head_dim)
        v = self.wv(x).view(b, t, -1, self.head_dim)
        if self.config.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = rope.apply(q, ctx.cos, ctx.sin, interleaved=False)
        k = rope.apply(k, ctx.cos, ctx.sin, interleaved=False)
        return self.wo(attend(self.layer, q, k, v, self.scale, ctx).reshape(b, t, -1))


class MLAttention(nn.Module):
    """Multi-head latent attention: low-rank q (or a plain q projection when q_lora_rank is None),
    keys/values expanded from a normed kv_lora_rank latent, plus one rope key shared by all heads."""

    def __init__(self, config, layer: int):
        super().__init__()
        self.layer, self.config = layer, config
        h, n = config.hidden_size, config.num_attention_heads
        self.n_heads, self.nope, self.v_dim = n, config.qk_nope_head_dim, config.v_head_dim
        self.rope_dim = config.qk_rope_head_dim
        qk = self.nope + self.rope_dim
        if config.q_lora_rank is None:
            self.wq = nn.Linear(h, n * qk, bias=False)
        else:
            self.wq_a = nn.Linear(h, config.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(config.q_lora_rank)  # eps 1e-6 as transformers, not rms_norm_eps
            self.wq_b = nn.Linear(config.q_lora_rank, n * qk, bias=False)
        self.wkv_a = nn.Linear(h, config.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_norm = RMSNorm(config.kv_lora_rank)
        self.wkv_b = nn.Linear(config.kv_lora_rank, n * (self.nope + self.v_dim), bias=False)
        self.wo = nn.Linear(n * self.v_dim, h, bias=False)
        self.scale = rope.softmax_scale(config)

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.wq(x) if self.config.q_lora_rank is None else self.wq_b(self.q_norm(self.wq_a(x)))
        q_nope, q_rope = q.view(b, t, -1, self.nope + self.rope_dim).split([self.nope, self.rope_dim], dim=-1)
        latent, k_rope = self.wkv_a(x).split([self.config.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_norm(latent)
        interleaved = self.config.rope_interleave
        q_rope = rope.apply(q_rope, ctx.cos, ctx.sin, interleaved=interleaved)
        k_rope = rope.apply(k_rope[:, :, None], ctx.cos, ctx.sin, interleaved=interleaved)  # [B, T, 1, rope]
        if isinstance(ctx.path, CachedAttn):
            return self.wo(self._attend_latent(q_nope, q_rope, latent, k_rope, ctx.path).reshape(b, t, -1))
        k_nope, v = self.wkv_b(latent).view(b, t, -1, self.nope + self.v_dim).split([self.nope, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        k = torch.cat([k_nope, k_rope.expand(-1, -1, self.n_heads, -1)], dim=-1)
        return self.wo(attend(self.layer, q, k, v, self.scale, ctx).reshape(b, t, -1))

    def _attend_latent(self, q_nope, q_rope, latent, k_rope, view: CachedAttn) -> torch.Tensor:
        """Cached attention in the latent space: q_nope [B, T, H, nope], q_rope [B, T, H, rope], latent
        [B, T, r], k_rope [B, T, 1, rope] -> [B, T, H, v]."""
        up = self.wkv_b.weight.view(-1, self.nope + self.v_dim, self.config.kv_lora_rank)  # [H, nope + v, r]
        q_latent = torch.einsum("bthn,hnr->bthr", q_nope, up[:, :self.nope])
        q = torch.cat([q_latent, q_rope], dim=-1)
        entry = torch.cat([latent[:, :, None], k_rope], dim=-1)  # [B, T, 1, r + rope]: one shared head
        out_latent = attend_cached(self.layer, q, entry, None, self.scale, view)  # [B, T, H, r]
        return torch.einsum("bthr,hvr->bthv", out_latent, up[:, self.nope:])
