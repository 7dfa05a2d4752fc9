"""Model shapes shared by the GPU benchmarks (configs only, no weights).

- `moe_0p7b`: a DeepSeek-V3-style MoE of 0.68 B parameters, 0.16 B of them multiplied per token (see
  model_flops.py): MLA with a q LoRA, one dense layer then 11 MoE layers of 32 routed experts (top-4 of
  4 groups, 2 groups kept) + 1 shared expert, sigmoid router with bias, vocabulary 32,768. Parts c (the
  native engine against `generate`) and d (a GRPO step) of benchmarks/gpu_check.py run it: large enough
  that an H200 runs kernels rather than launches, small enough to build, save and reload in seconds.
- `toy`: the embedded tiny default (1.8 M parameters), for the CPU dry run.

`config(name)` also accepts the presets of r1mega.models.config by name.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # `import r1mega` from a checkout

from r1mega.models import config as presets  # noqa: E402
from r1mega.models.config import ModelConfig  # noqa: E402

MODELS = {
    "moe_0p7b": lambda: ModelConfig(
        architecture="DeepseekV3ForCausalLM", vocab_size=32768, hidden_size=1024, intermediate_size=2816,
        num_hidden_layers=12, num_attention_heads=16, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64,
        qk_rope_head_dim=32, v_head_dim=64, n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4,
        moe_intermediate_size=512, n_group=4, topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1,
        max_position_embeddings=4096),
    "toy": presets.tiny_deepseek_v3,
}


def config(name: str) -> ModelConfig:
    if name in MODELS:
        return MODELS[name]()
    return presets.preset(name)
