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
from r1mega.models.attention import AttnContext, CacheSlots, GQAttention, Layout, MLAttention, Segments
from r1mega.models.config import ModelConfig
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
            return x + self.ffn(self.ffn_norm(x), token_repeats=ctx.token_repeats, routing=ctx.routing)
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


def attn_context(config: ModelConfig, input_ids: torch.Tensor, dtype: torch.dtype, layout: Layout = None, *,
                 position_ids: Optional[torch.Tensor] = None, routing: Optional[Routing] = None) -> AttnContext:
    """What every layer's attention needs about a forward over input_ids [B, T] (Transformer.forward
    says what the arguments mean); a pipeline stage builds it from the same arguments."""
    b, t = input_ids.shape
    if isinstance(layout, CacheSlots) and position_ids is None:
        raise ValueError("Transformer.forward: a KV cache needs position_ids")
    if isinstance(layout, SharedPrefixRow) and (position_ids is None or b != 1 or layout.collect.numel() != t):
        raise ValueError("Transformer.forward: a shared-prefix row needs position_ids and one row of "
                         f"the {layout.collect.numel()} tokens it describes, got {b} x {t}")
    if position_ids is None:
        position_ids = (segment_positions(layout.ids) if isinstance(layout, Segments)
                        else torch.arange(t, device=input_ids.device).expand(b, t))
    if routing is not None:
        moe_layers = sum(map(config.is_moe_layer, range(config.num_hidden_layers)))
        routing.check(b * t, moe_layers, config.num_experts_per_tok)
    cos, sin = rope.cos_sin(config, position_ids, dtype)
    if isinstance(layout, CacheSlots):
        return AttnContext.cached(cos, sin, layout, position_ids, routing)
    if isinstance(layout, Segments):
        return AttnContext.packed(cos, sin, segment_spans(layout.ids), routing)
    if isinstance(layout, SharedPrefixRow):
        return AttnContext.shared_prefix(cos, sin, layout, routing)
    if layout is not None:
        raise TypeError(f"Transformer.forward: layout must be Segments, SharedPrefixRow, CacheSlots or None, "
                        f"got {type(layout).__name__}")
    return AttnContext.causal(cos, sin, routing)


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

    def forward(self, input_ids: torch.Tensor, layout: Layout = None, *, position_ids: Optional[torch.Tensor] = None,
                routing: Optional[Routing] = None, return_hidden: bool = False) -> torch.Tensor:
        """input_ids [B, T] -> float logits [B, T, V], or final-normed hidden states [B, T, H] if return_hidden.

        layout, one of (attention.py):
        - None: each row one causal sequence;
        - Segments(segment_ids [B, T]): packed rows; each run of equal ids attends only within itself
          and, unless position_ids is given, restarts at position 0;
        - a SharedPrefixRow: sequences reading a [1, T] row whose shared prefixes are stored once
          (shared_prefix.py); position_ids required;
        - CacheSlots(cache, slots (a slice or a [B] tensor of cache rows)): write this call's keys and
          values at position_ids (required) in the slots' cache rows and attend over them.
        routing: filled with each MoE layer's experts for the B x T tokens, and replayed from
        its record when it has one (routing.py).
        """
        h = self.embed(input_ids)  # [B, T, H]
        ctx = attn_context(self.config, input_ids, h.dtype, layout, position_ids=position_ids, routing=routing)
        for layer in self.layers:
            h = layer(h, ctx)
        h = self.norm(h)
        if return_hidden:
            return h
        # Through the module when untied, so a tensor-parallel output layer's hooks run.
        return (F.linear(h, self.embed.weight) if self.lm_head is None else self.lm_head(h)).float()
