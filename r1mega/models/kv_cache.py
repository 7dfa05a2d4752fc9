"""A preallocated key/value cache with one row ("slot") per sequence being generated.

The rollout engine owns one `KVCache` and hands it to `Transformer.forward` with the slots that the
batch's rows use: a `slice` of consecutive slots (the engine keeps its running sequences packed at the
front, so reads are views) or any tensor of slot indices (reads gather). Row b of the batch is
sequence `slots[b]`; its token at position p is stored at index p of that slot, and a query at
position p attends to indices 0..p of its slot. Prefill (many tokens per row) and decode (one token
per row) take the same path. A slot is reused by writing from position 0 again: stale entries past a
query's position are masked. The storage starts zeroed because masked attention still multiplies the
skipped values by 0, and 0 * NaN (uninitialised memory) is NaN.

Layout per layer: [slots, kv_heads, max_len, head_dim], so the keys of a slice of slots are a view
that matmul consumes without a copy. MLA caches what DeepSeek-V3's inference caches: one shared "head"
per token holding the normed kv latent followed by the rope key (kv_lora_rank + qk_rope_head_dim
numbers); its values are the latent part of the same storage (`values_in_keys`), so they are never
written twice. Attention then runs in the latent space (attention.MLAttention).
"""

from __future__ import annotations

from typing import Union

import torch

Slots = Union[slice, torch.Tensor]


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, max_len: int, num_kv_heads: int, k_head_dim: int,
                 v_head_dim: int, *, values_in_keys: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu"):
        self.num_slots, self.max_len = num_slots, max_len
        self.values_in_keys = values_in_keys
        shape = (num_slots, num_kv_heads, max_len)
        self.keys = [torch.zeros(*shape, k_head_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        if values_in_keys:
            if v_head_dim > k_head_dim:
                raise ValueError(f"values_in_keys needs v_head_dim {v_head_dim} <= k_head_dim {k_head_dim}")
            self.values = [k[..., :v_head_dim] for k in self.keys]
        else:
            self.values = [torch.zeros(*shape, v_head_dim, dtype=dtype, device=device) for _ in range(num_layers)]

    @classmethod
    def for_model(cls, config, num_slots: int, max_len: int, *, dtype=torch.float32, device="cpu") -> "KVCache":
        """Sizes the cache from a `ModelConfig` (MLA: the latent and rope key, values inside the keys)."""
        return cls(config.num_hidden_layers, num_slots, max_len, config.cache_kv_heads, config.cache_k_head_dim,
                   config.cache_v_head_dim, values_in_keys=config.is_mla, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_token(config, dtype=torch.float32) -> int:
        per_head = config.cache_k_head_dim + (0 if config.is_mla else config.cache_v_head_dim)
        return config.num_hidden_layers * config.cache_kv_heads * per_head * torch.finfo(dtype).bits // 8

    @property
    def stores(self) -> list[torch.Tensor]:
        """Every tensor that owns cache memory (for clearing and copying slots)."""
        return self.keys if self.values_in_keys else [*self.keys, *self.values]

    def rows(self, slots: Slots, positions: torch.Tensor, length: int) -> torch.Tensor:
        """The slot [B, T] of each of `positions` [B, T] (what `write` indexes with; one per forward).
        `length`: max position + 1, checked against max_len."""
        if length > self.max_len:
            raise ValueError(f"position {length - 1} is past the cache's max_len {self.max_len}")
        if isinstance(slots, slice):
            slots = torch.arange(slots.start, slots.stop, device=positions.device)
        return slots[:, None].expand_as(positions)

    def write(self, layer: int, rows: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None):
        """Stores k [B, T, Hkv, Dk] and v [B, T, Hkv, Dv] (None when values_in_keys) at `positions` [B, T]
        of the slots `rows` [B, T] (from `rows`)."""
        self.keys[layer][rows, :, positions] = k.to(self.keys[layer].dtype)
        if not self.values_in_keys:
            self.values[layer][rows, :, positions] = v.to(self.values[layer].dtype)

    def read(self, layer: int, slots: Slots, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, Hkv, length, D] of the rows `slots`, from index 0 (views for a slice)."""
        return self.keys[layer][slots, :, :length], self.values[layer][slots, :, :length]
