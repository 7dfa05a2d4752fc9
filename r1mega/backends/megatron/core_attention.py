"""`SDPACoreAttention`: megatron-core's core-attention slot filled with PyTorch's SDPA, for when
Transformer Engine is absent.

megatron-core's own fallback (`DotProductAttention`) materialises the [b*heads, s, s] scores and
does not accept the `k_channels` / `v_channels` that multi-latent attention passes (query/key heads
of qk_nope + qk_rope dims, value heads of v_head_dim), so MLA cannot be built without TE. This module
takes the same constructor arguments as TE's `TEDotProductAttention` and runs
`torch.nn.functional.scaled_dot_product_attention` (flash / memory-efficient kernels on GPU, keys and
values of different head dims, grouped-query heads without copies), with the softmax scale the
attention layer hands it (MLA: YaRN mscale^2 / sqrt(q_head_dim)).

Deliberately left out: packed sequences (`packed_seq_params`, THD layout: TE's job), context
parallelism, attention biases, sliding windows, softmax variants other than the vanilla one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule


class SDPACoreAttention(MegatronModule):
    """Core attention: query [sq, b, np, dk], key [sk, b, ng, dk], value [sk, b, ng, dv] -> [sq, b, np*dv]."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType, attention_type: str = "self",
                 attention_dropout: float | None = None, softmax_scale: float | None = None,
                 k_channels: int | None = None, v_channels: int | None = None, cp_comm_type: str | None = None,
                 pg_collection=None):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise NotImplementedError("SDPACoreAttention: context parallelism needs Transformer Engine")
        if getattr(config, "window_size", None) is not None:
            raise NotImplementedError("SDPACoreAttention: sliding-window attention is not supported")
        if getattr(config, "softmax_type", "vanilla") != "vanilla":
            raise NotImplementedError(f"SDPACoreAttention: softmax_type={config.softmax_type!r} is not supported")
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        k_dim = k_channels if k_channels is not None else config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else k_dim ** -0.5
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, attn_mask_type: AttnMaskType | None = None,
                attention_bias: torch.Tensor | None = None, packed_seq_params=None) -> torch.Tensor:
        if packed_seq_params is not None:
            raise NotImplementedError("SDPACoreAttention: packed sequences (THD) need Transformer Engine")
        if attention_bias is not None:
            raise NotImplementedError("SDPACoreAttention: attention_bias is not supported")
        mask_type = self.attn_mask_type if attn_mask_type is None else attn_mask_type
        causal = mask_type == AttnMaskType.causal
        sq, b, n_heads, _ = query.shape
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        attn_mask = None
        if attention_mask is not None:
            # megatron's masks are True where attention is NOT allowed; SDPA's boolean masks the opposite
            attn_mask = ~attention_mask.bool()  # broadcastable to [b, np, sq, sk]
            if causal:
                attn_mask = attn_mask & torch.ones(sq, k.shape[2], dtype=torch.bool, device=q.device).tril()
            causal = False
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=causal, scale=self.softmax_scale,
            dropout_p=self.dropout if self.training else 0.0, enable_gqa=q.shape[1] != k.shape[1])  # [b, np, sq, dv]
        return out.permute(2, 0, 1, 3).reshape(sq, b, n_heads * v.shape[-1])
