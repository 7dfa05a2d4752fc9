"""Hugging Face names of the Llama family: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM.

They share one layout: `model.layers.{i}.self_attn.{q,k,v,o}_proj` (biases where the config has
them), Qwen3's `self_attn.{q,k}_norm`, and a SwiGLU `mlp.{gate,up,down}_proj`. Qwen3-MoE reuses the
attention names (qwen3_moe.py).

Deliberately left out: Llama's `mlp_bias`, rejected by the config.
"""

from __future__ import annotations

import re
from typing import Iterable, Iterator


def attention_names(config) -> dict[str, str]:
    """native suffix (under layers.{i}.) -> HF suffix (under model.layers.{i}.), attention and norms."""
    names = {"attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight"}
    for native, hf in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
        names[f"attn.{native}.weight"] = f"self_attn.{hf}.weight"
        if (config.attention_bias and native != "wo") or (config.attention_out_bias and native == "wo"):
            names[f"attn.{native}.bias"] = f"self_attn.{hf}.bias"
    if config.qk_norm:
        names["attn.q_norm.weight"] = "self_attn.q_norm.weight"
        names["attn.k_norm.weight"] = "self_attn.k_norm.weight"
    return names


def dense_ffn_names(prefix: str = "ffn", hf_prefix: str = "mlp") -> dict[str, str]:
    return {f"{prefix}.{p}.weight": f"{hf_prefix}.{p}_proj.weight" for p in ("gate", "up", "down")}


def layer_names(config, layer: int) -> dict[str, str]:
    return {**attention_names(config), **dense_ffn_names()}


_ROTARY = re.compile(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq")


def filter_stream(hf_config: dict, config, stream: Iterable) -> Iterator:
    """Drops the rotary `inv_freq` buffers that old Llama checkpoints saved; they are recomputed."""
    return ((name, t) for name, t in stream if not _ROTARY.fullmatch(name))
