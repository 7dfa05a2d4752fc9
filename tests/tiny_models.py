"""Tiny random Hugging Face models for tests: configs of each supported architecture, built with
transformers from a config (no download), every weight randomised (norms, biases and the expert bias
too, so that a mapping error shows), and saved with `save_pretrained` (the hub layout, per-expert
tensors). Other test files reuse `make_hf_dir` and `hf_config`.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Small shapes shared by every architecture; each variant overrides what it tests.
_COMMON = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.1,
               bos_token_id=None, eos_token_id=None, pad_token_id=None)

VARIANTS = {
    "llama": ("LlamaConfig", dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "llama_bias_tied_mha": ("LlamaConfig", dict(num_key_value_heads=4, attention_bias=True, tie_word_embeddings=True)),
    "llama3_rope": ("LlamaConfig", dict(num_key_value_heads=1, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "qwen2": ("Qwen2Config", dict(num_key_value_heads=2, tie_word_embeddings=True)),
    "qwen2_yarn": ("Qwen2Config", dict(num_key_value_heads=1, max_position_embeddings=128, tie_word_embeddings=False,
                                       rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                     "original_max_position_embeddings": 32})),
    "qwen3": ("Qwen3Config", dict(num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_key_value_heads=2, head_dim=8, num_experts=6, num_experts_per_tok=2,
                                         moe_intermediate_size=16, norm_topk_prob=True, mlp_only_layers=[0])),
    "qwen3_moe_unnormed": ("Qwen3MoeConfig", dict(num_key_value_heads=4, num_experts=4, num_experts_per_tok=3,
                                                  moe_intermediate_size=16, norm_topk_prob=False, tie_word_embeddings=True)),
    "deepseek_v3": ("DeepseekV3Config", dict(
        num_hidden_layers=3, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
        moe_intermediate_size=16, n_group=4, topk_group=2, first_k_dense_replace=1, routed_scaling_factor=2.5)),
    "deepseek_v3_no_q_lora": ("DeepseekV3Config", dict(
        num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
        v_head_dim=8, n_routed_experts=4, n_shared_experts=2, num_experts_per_tok=2, moe_intermediate_size=16,
        n_group=1, topk_group=1, first_k_dense_replace=0, routed_scaling_factor=1.0, tie_word_embeddings=True,
        rope_interleave=False)),
    "deepseek_v3_yarn": ("DeepseekV3Config", dict(
        num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
        max_position_embeddings=1280, v_head_dim=8, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
        moe_intermediate_size=16,
        n_group=2, topk_group=1, first_k_dense_replace=1, rope_scaling={
            "rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 32, "beta_fast": 32,
            "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})),
}


def hf_config(variant: str, **overrides):
    import transformers

    cls_name, kw = VARIANTS[variant]
    kw = {**_COMMON, **kw, **overrides}
    rope = kw.pop("rope_scaling", None)
    cfg = getattr(transformers, cls_name)(**kw)
    if rope is not None:  # transformers 5 keeps rope settings (with rope_theta) in rope_parameters
        cfg.rope_parameters = {"rope_theta": 10000.0, **rope}
    return cfg


@torch.no_grad()
def randomize(model, seed: int = 0) -> None:
    """Perturbs what HF initialises to constants (norms to 1, biases and expert bias to 0)."""
    g = torch.Generator().manual_seed(seed)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if "norm" in name and name.endswith("weight"):
            t.copy_(1 + 0.2 * torch.randn(t.shape, generator=g))
        elif name.endswith("bias"):  # q/k/v/o biases and e_score_correction_bias
            t.copy_(0.1 * torch.randn(t.shape, generator=g))


def make_hf_model(variant: str, seed: int = 0, **overrides):
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config(variant, **overrides), dtype=torch.float32)
    randomize(model, seed)
    return model.eval()


def make_hf_dir(variant: str, path: Path, seed: int = 0, **overrides) -> Path:
    """Saves a random tiny HF model of `variant` to `path` (hub layout) and returns the path."""
    make_hf_model(variant, seed, **overrides).save_pretrained(path)
    return Path(path)


def load_hf(path: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
