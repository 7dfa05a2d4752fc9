"""Hugging Face names of DeepseekV3ForCausalLM, and what its hub checkpoint needs on the way in.

Layout: `self_attn.{q_proj | q_a_proj, q_a_layernorm, q_b_proj}`, `self_attn.kv_a_proj_with_mqa`,
`kv_a_layernorm`, `kv_b_proj`, `o_proj`; dense layers `mlp.{gate,up,down}_proj`; MoE layers
`mlp.gate.weight`, `mlp.gate.e_score_correction_bias`, `mlp.shared_experts.*` and per-expert
`mlp.experts.{e}.*`. The hub checkpoint also holds the multi-token-prediction layer(s)
(`model.layers.{num_hidden_layers + j}`), skipped here, and FP8 weights with one `weight_scale_inv`
per 128x128 block, dequantised here (to bf16) as they stream in.

Deliberately left out: writing FP8 (saves are in the model's dtype), the MTP layers.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator

import torch

from r1mega.models.checkpoint import CheckpointError
from r1mega.models.hf.llama import dense_ffn_names

_FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def layer_names(config, layer: int) -> dict[str, str]:
    names = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
             "attn.wkv_a.weight": "self_attn.kv_a_proj_with_mqa.weight",
             "attn.kv_norm.weight": "self_attn.kv_a_layernorm.weight",
             "attn.wkv_b.weight": "self_attn.kv_b_proj.weight", "attn.wo.weight": "self_attn.o_proj.weight"}
    if config.q_lora_rank is None:
        names["attn.wq.weight"] = "self_attn.q_proj.weight"
    else:
        names.update({"attn.wq_a.weight": "self_attn.q_a_proj.weight",
                      "attn.q_norm.weight": "self_attn.q_a_layernorm.weight",
                      "attn.wq_b.weight": "self_attn.q_b_proj.weight"})
    if config.is_moe_layer(layer):
        names["ffn.router.weight"] = "mlp.gate.weight"
        names["ffn.router.expert_bias"] = "mlp.gate.e_score_correction_bias"
        if config.n_shared_experts:
            names.update(dense_ffn_names("ffn.shared", "mlp.shared_experts"))
    else:
        names.update(dense_ffn_names())
    return names


def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """weight [R, C] fp8 times scale_inv [ceil(R/b0), ceil(C/b1)], one scale per block -> bf16 [R, C]."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (weight.float() * scale).to(torch.bfloat16)


def filter_stream(hf_config: dict, config, stream: Iterable) -> Iterator:
    """Skips MTP layers and dequantises FP8 weights with their scales (either may come first)."""
    quant = hf_config.get("quantization_config") or {}
    block = tuple(quant.get("weight_block_size") or (128, 128))
    weights: dict[str, torch.Tensor] = {}
    scales: dict[str, torch.Tensor] = {}
    for name, t in stream:
        m = _LAYER.match(name)
        if m and int(m.group(1)) >= config.num_hidden_layers:
            continue  # multi-token-prediction layer
        if name.endswith(".weight_scale_inv"):
            key = name[: -len("_scale_inv")]
            if key in weights:
                yield key, dequantize_fp8(weights.pop(key), t, block)
            else:
                scales[key] = t
        elif t.dtype in _FP8:
            if name in scales:
                yield name, dequantize_fp8(t, scales.pop(name), block)
            else:
                weights[name] = t
        else:
            yield name, t
    unpaired = sorted(weights) + [k + "_scale_inv" for k in sorted(scales)]
    if unpaired:
        raise CheckpointError(f"FP8 weight(s) without their scale or scale(s) without weight: {', '.join(unpaired[:8])}")
