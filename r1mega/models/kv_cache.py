"""A preallocated key/value cache with one row ("slot") per sequence being generated.

The rollout engine owns one `KVCache` and hands it to `Transformer.forward` with the slots that the
batch's rows use. Row b of the batch is sequence `slots[b]`; its token at position p is stored at
index p of that slot, and a query at position p attends to indices 0..p of its slot. Prefill (many
tokens per row) and decode (one token per row) take the same path. A slot is reused by writing from
position 0 again: stale entries past a query's position are masked. The storage starts zeroed because
masked attention still multiplies the skipped values by 0, and 0 * NaN (uninitialised memory) is NaN.

Deliberate simplification: MLA caches its expanded per-head keys and values, not the compressed
latent; that costs memory at scale but keeps one attention path for every architecture.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, num_slots: int, max_len: int, num_kv_heads: int, k_head_dim: int,
                 v_head_dim: int, *, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        self.num_slots, self.max_len = num_slots, max_len
        # [slots, max_len, kv_heads, head_dim] per layer: a write is one index_put per layer and step.
        self.keys = [torch.zeros(num_slots, max_len, num_kv_heads, k_head_dim, dtype=dtype, device=device)
                     for _ in range(num_layers)]
        self.values = [torch.zeros(num_slots, max_len, num_kv_heads, v_head_dim, dtype=dtype, device=device)
                       for _ in range(num_layers)]

    @classmethod
    def for_model(cls, config, num_slots: int, max_len: int, *, dtype=torch.float32, device="cpu") -> "KVCache":
        """Sizes the cache from a `ModelConfig` (MLA: k = nope + rope dims, every head cached)."""
        return cls(config.num_hidden_layers, num_slots, max_len, config.cache_kv_heads, config.cache_k_head_dim,
                   config.cache_v_head_dim, dtype=dtype, device=device)

    @staticmethod
    def bytes_per_token(config, dtype=torch.float32) -> int:
        per_head = config.cache_k_head_dim + config.cache_v_head_dim
        return config.num_hidden_layers * config.cache_kv_heads * per_head * torch.finfo(dtype).bits // 8

    def write(self, layer: int, slots: torch.Tensor, positions: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Stores k [B, T, Hkv, Dk] and v [B, T, Hkv, Dv] of rows `slots` [B] at `positions` [B, T]."""
        if int(positions.max()) >= self.max_len:
            raise ValueError(f"position {int(positions.max())} is past the cache's max_len {self.max_len}")
        rows = slots[:, None].expand_as(positions)
        self.keys[layer][rows, positions] = k.to(self.keys[layer].dtype)
        self.values[layer][rows, positions] = v.to(self.values[layer].dtype)

    def read(self, layer: int, slots: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, length, Hkv, D] of the rows `slots` [B], from index 0."""
        return self.keys[layer][slots, :length], self.values[layer][slots, :length]
