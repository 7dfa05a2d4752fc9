"""`Transformer`: one decoder-only model for DeepSeek-V3, Llama, Qwen2, Qwen3 and Qwen3-MoE.

Pre-norm blocks (RMSNorm -> attention -> residual, RMSNorm -> FFN -> residual); attention is MLA for
DeepSeek-V3 and GQA otherwise (attention.py); the FFN is a SwiGLU or, where the config says so, a
mixture of experts (moe.py). Parameter names are the native layout (hf/ maps them to Hugging Face):
    embed.weight, layers.{i}.attn_norm.weight, layers.{i}.attn.{wq,wk,wv,wo,...},
    layers.{i}.ffn_norm.weight, layers.{i}.ffn.{gate,up,down}.weight (dense) or
    layers.{i}.ffn.{router.weight, router.expert_bias, experts.{gate,up,down}, shared.*} (MoE),
    norm.weight, lm_head.weight (absent when tie_word_embeddings).

Deliberately left out: devices and parallelism (r1mega/parallel applies them afterwards), dropout,
multi-token prediction, sampling (the rollout engine samples from the logits).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from r1mega.models import rope
from r1mega.models.attention import AttnContext, GQAttention, MLAttention
from r1mega.models.config import ModelConfig
from r1mega.models.kv_cache import KVCache, Slots
from r1mega.models.moe import MoE, SwiGLU
from r1mega.models.norm import RMSNorm
from r1mega.models.routing import Routing
from r1mega.models.shared_prefix import SharedPrefixRow


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = MLAttention(config, layer) if config.is_mla else GQAttention(config, layer)
        self.ffn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn = (MoE(config, moe_index=sum(map(config.is_moe_layer, range(layer))))
                    if config.is_moe_layer(layer) else SwiGLU(config.hidden_size, config.intermediate_size))

    def forward(self, x: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), ctx)
        if isinstance(self.ffn, MoE):
            repeats = ctx.shared.repeats if ctx.shared is not None else None
            return x + self.ffn(self.ffn_norm(x), token_repeats=repeats, routing=ctx.routing)
        return x + self.ffn(self.ffn_norm(x))


def segment_spans(segment_ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Per row of segment_ids [B, T], the [start, end) of each run of equal ids (a packed sequence)."""
    changes = (segment_ids[:, 1:] != segment_ids[:, :-1]).cpu()  # [B, T-1]
    t = segment_ids.shape[1]
    spans = []
    for row in changes:
        bounds = [0] + (row.nonzero().flatten() + 1).tolist() + [t]
        spans.append(list(zip(bounds[:-1], bounds[1:])))
    return spans


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Positions [B, T] restarting at 0 where each run of equal segment ids starts."""
    b, t = segment_ids.shape
    idx = torch.arange(t, device=segment_ids.device).expand(b, t)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return idx - torch.where(starts, idx, 0).cummax(dim=1).values


def attn_context(config: ModelConfig, input_ids: torch.Tensor, dtype: torch.dtype, *,
                 position_ids: Optional[torch.Tensor] = None, segment_ids: Optional[torch.Tensor] = None,
                 shared: Optional[SharedPrefixRow] = None, cache: Optional[KVCache] = None,
                 slots: Optional[Slots] = None, routing: Optional[Routing] = None) -> AttnContext:
    """What every layer's attention needs about a forward over input_ids [B, T] (Transformer.forward
    says what the arguments mean); a pipeline stage builds it from the same arguments."""
    b, t = input_ids.shape
    ctx_kw = {}
    if cache is not None:
        if position_ids is None or slots is None:
            raise ValueError("Transformer.forward: a KV cache needs position_ids and slots")
        if segment_ids is not None or shared is not None:
            raise ValueError("Transformer.forward: segment_ids or shared and a KV cache cannot be combined")
        cache_len = int(position_ids.max()) + 1
        rows = cache.rows(slots, position_ids, cache_len)
        hidden = torch.arange(cache_len, device=position_ids.device) > position_ids[..., None]
        ctx_kw = dict(cache=cache, slots=slots, rows=rows, positions=position_ids, cache_len=cache_len,
                      hidden=hidden)
    elif segment_ids is not None:
        if shared is not None:
            raise ValueError("Transformer.forward: give segment_ids or shared, not both")
        ctx_kw = dict(spans=segment_spans(segment_ids))
        if position_ids is None:
            position_ids = segment_positions(segment_ids)
    elif shared is not None:
        if position_ids is None or b != 1 or shared.collect.numel() != t:
            raise ValueError("Transformer.forward: a shared-prefix row needs position_ids and one row of "
                             f"the {shared.collect.numel()} tokens it describes, got {b} x {t}")
        ctx_kw = dict(shared=shared)
    if position_ids is None:
        position_ids = torch.arange(t, device=input_ids.device).expand(b, t)
    if routing is not None:
        moe_layers = sum(map(config.is_moe_layer, range(config.num_hidden_layers)))
        routing.check(b * t, moe_layers, config.num_experts_per_tok)
    cos, sin = rope.cos_sin(config, position_ids, dtype)
    return AttnContext(cos=cos, sin=sin, routing=routing, **ctx_kw)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.init_weights()

    @property
    def output_weight(self) -> torch.Tensor:
        """The [V, H] output matrix: lm_head, or the embedding when tied."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """Random init for training from scratch: N(0, std) matrices, unit norms, zero biases."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, MoE):
                for p in (module.router.weight, module.experts.gate, module.experts.up, module.experts.down):
                    nn.init.normal_(p, std=std)
                if module.router.expert_bias is not None:
                    module.router.expert_bias.zero_()

    def forward(self, input_ids: torch.Tensor, *, position_ids: Optional[torch.Tensor] = None,
                segment_ids: Optional[torch.Tensor] = None, shared: Optional[SharedPrefixRow] = None,
                cache: Optional[KVCache] = None, slots: Optional[Slots] = None,
                routing: Optional[Routing] = None, return_hidden: bool = False) -> torch.Tensor:
        """input_ids [B, T] -> float logits [B, T, V], or final-normed hidden states [B, T, H] if return_hidden.

        segment_ids [B, T]: packed rows; each run of equal ids attends only within itself and, unless
        position_ids is given, restarts at position 0. shared: sequences reading a [1, T] row
        whose shared prefixes are stored once (shared_prefix.py); position_ids required.
        cache + slots (a slice or a [B] tensor of cache rows): write this call's keys and values at
        position_ids (required) in the slots' cache rows and attend over them.
        routing: filled with each MoE layer's experts for the B x T tokens, and replayed from
        its record when it has one (routing.py).
        """
        h = self.embed(input_ids)  # [B, T, H]
        ctx = attn_context(self.config, input_ids, h.dtype, position_ids=position_ids, segment_ids=segment_ids,
                           shared=shared, cache=cache, slots=slots, routing=routing)
        for layer in self.layers:
            h = layer(h, ctx)
        h = self.norm(h)
        if return_hidden:
            return h
        # Through the module when untied, so a tensor-parallel output layer's hooks run.
        return (F.linear(h, self.embed.weight) if self.lm_head is None else self.lm_head(h)).float()
