"""Hugging Face names of Qwen3MoeForCausalLM: Qwen3 attention (llama.py) and, in sparse layers,
`mlp.gate.weight` (the router) plus per-expert `mlp.experts.{e}.{gate,up,down}_proj.weight`; layers
listed in `mlp_only_layers` (or off the `decoder_sparse_step`) keep a dense `mlp`.

Deliberately left out: Qwen2-MoE's shared expert (Qwen3-MoE has none).
"""

from __future__ import annotations

from r1mega.models.hf.llama import attention_names, dense_ffn_names, filter_stream  # noqa: F401


def layer_names(config, layer: int) -> dict[str, str]:
    names = attention_names(config)
    if config.is_moe_layer(layer):
        names["ffn.router.weight"] = "mlp.gate.weight"
    else:
        names.update(dense_ffn_names())
    return names
