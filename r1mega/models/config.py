"""`ModelConfig`: the shape of every transformer r1mega builds, with Hugging Face field names.

One flat dataclass covers the five supported architectures (DeepSeek-V3, Llama, Qwen2, Qwen3,
Qwen3-MoE); `architecture` says which HF class a checkpoint maps to. `from_hf` reads a config.json
dict (legacy `rope_theta`/`rope_scaling` or transformers-5 `rope_parameters`), `to_hf` writes one that
transformers loads. HF keys that do not change the computation (token ids, initializer range...) ride
along in `hf_extra` so a conversion round trip keeps them.

Deliberately left out: sliding-window attention, biases in MLPs, activations other than SiLU,
DeepSeek's multi-token-prediction layers (their weights are skipped on load), partial rotary factors.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

ARCHITECTURES = (
    "DeepseekV3ForCausalLM",
    "LlamaForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
)
MODEL_TYPES = {
    "DeepseekV3ForCausalLM": "deepseek_v3",
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
ROPE_TYPES = ("default", "linear", "yarn", "llama3")

# HF keys that from_hf interprets (or that are rebuilt by to_hf); anything else goes to hf_extra.
_HF_CONSUMED = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "quantization_config",
    "rope_theta", "rope_scaling", "rope_parameters", "num_experts", "hidden_act", "use_sliding_window",
    "sliding_window", "max_window_layers", "qk_head_dim", "topk_method", "mlp_bias", "partial_rotary_factor",
    "use_cache", "output_router_logits", "auto_map", "num_local_experts", "scoring_func", "router_aux_loss_coef",
    "attention_dropout", "layer_types", "moe_layer_freq",
}


class ConfigError(ValueError):
    """A model config that r1mega cannot build, with the offending key in the message."""


@dataclass
class ModelConfig:
    architecture: str = "DeepseekV3ForCausalLM"
    vocab_size: int = 32000
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: Optional[int] = None  # None: = num_attention_heads
    head_dim: Optional[int] = None  # GQA only; None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # {"rope_type": "yarn"|"linear"|"llama3", "factor": ..., ...} with HF's keys, or None.
    rope_scaling: Optional[dict] = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q, k, v projections (Qwen2: always)
    attention_out_bias: bool = False  # bias on the output projection (Llama/Qwen3 attention_bias=True)
    qk_norm: bool = False  # per-head RMSNorm on q and k before rope (Qwen3)
    # Multi-head latent attention (DeepSeek-V3); used when architecture is DeepseekV3ForCausalLM.
    q_lora_rank: Optional[int] = None  # None: plain q projection
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = True  # DeepSeek-V3 checkpoints store rope dims as interleaved pairs
    # Mixture of experts (n_routed_experts == 0: every layer dense).
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    scoring_func: str = "sigmoid"  # "sigmoid" (DeepSeek-V3, with expert bias) or "softmax" (Qwen3-MoE)
    first_k_dense_replace: int = 0  # the first k layers are dense
    decoder_sparse_step: int = 1  # Qwen3-MoE: layer i is MoE when (i + 1) % step == 0
    mlp_only_layers: list[int] = field(default_factory=list)  # Qwen3-MoE: these layers are dense
    num_nextn_predict_layers: int = 0  # DeepSeek-V3 MTP layers in the checkpoint (skipped)
    hf_extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None and not self.is_mla:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.rope_scaling is not None:
            self.rope_scaling = dict(self.rope_scaling)
            self.rope_scaling.setdefault("rope_type", self.rope_scaling.pop("type", "default"))
            if self.rope_scaling["rope_type"] == "default":
                self.rope_scaling = None
        self.mlp_only_layers = list(self.mlp_only_layers)
        self.validate()

    # ---- derived shapes -------------------------------------------------------------------------
    @property
    def is_mla(self) -> bool:
        return self.architecture == "DeepseekV3ForCausalLM"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def rope_dim(self) -> int:
        return self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def cache_kv_heads(self) -> int:
        # MLA caches one latent "head" per token (see kv_cache.py).
        return 1 if self.is_mla else self.num_key_value_heads

    @property
    def cache_k_head_dim(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim if self.is_mla else self.head_dim

    @property
    def cache_v_head_dim(self) -> int:
        return self.kv_lora_rank if self.is_mla else self.head_dim

    def is_moe_layer(self, i: int) -> bool:
        if self.n_routed_experts == 0 or i < self.first_k_dense_replace or i in self.mlp_only_layers:
            return False
        return (i + 1) % self.decoder_sparse_step == 0

    # ---- validation -----------------------------------------------------------------------------
    def validate(self) -> None:
        def need(ok: bool, key: str, why: str):
            if not ok:
                raise ConfigError(f"model config: {key}={getattr(self, key, None)!r}: {why}")

        need(self.architecture in ARCHITECTURES, "architecture", f"unsupported; known: {', '.join(ARCHITECTURES)}")
        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
            need(getattr(self, key) > 0, key, "must be positive")
        need(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
             f"must divide num_attention_heads={self.num_attention_heads}")
        if self.is_mla:
            for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                need(getattr(self, key) > 0, key, "MLA needs it positive")
            need(self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank", "must be None or positive")
            need(self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim", "must be even")
            need(not self.qk_norm, "qk_norm", "not part of MLA")
        else:
            need(self.head_dim and self.head_dim % 2 == 0, "head_dim", "must be positive and even")
        if self.rope_scaling is not None:
            need(self.rope_scaling["rope_type"] in ROPE_TYPES, "rope_scaling", f"rope_type must be one of {ROPE_TYPES}")
            need(self.rope_scaling["rope_type"] == "yarn" or self.rope_scaling.get("factor") is not None,
                 "rope_scaling", "needs a factor")
        need(self.scoring_func in ("sigmoid", "softmax"), "scoring_func", "must be 'sigmoid' or 'softmax'")
        need(self.n_routed_experts > 0 or self.architecture != "Qwen3MoeForCausalLM", "n_routed_experts",
             "Qwen3MoeForCausalLM needs experts (num_experts)")
        need(self.decoder_sparse_step >= 1, "decoder_sparse_step", "must be >= 1")
        if self.n_routed_experts:
            need(self.moe_intermediate_size > 0, "moe_intermediate_size", "MoE needs it positive")
            need(self.n_group >= 1 and self.n_routed_experts % self.n_group == 0, "n_group",
                 f"must divide n_routed_experts={self.n_routed_experts}")
            need(1 <= self.topk_group <= self.n_group, "topk_group", f"must be in [1, n_group={self.n_group}]")
            eligible = self.topk_group * self.n_routed_experts // self.n_group
            need(1 <= self.num_experts_per_tok <= eligible, "num_experts_per_tok",
                 f"must be in [1, {eligible}] (experts in the kept groups)")
            need(0 <= self.first_k_dense_replace <= self.num_hidden_layers, "first_k_dense_replace",
                 f"must be in [0, num_hidden_layers={self.num_hidden_layers}]")
        if not all(self.is_moe_layer(i) for i in range(self.num_hidden_layers)):
            need(self.intermediate_size > 0, "intermediate_size", "dense layers need it positive")

    # ---- dict forms -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"model config: unknown key(s) {', '.join(unknown)}")
        return cls(**d)

    @classmethod
    def from_hf(cls, hf: dict[str, Any]) -> "ModelConfig":
        """Reads a Hugging Face config.json dict; raises ConfigError naming what r1mega cannot build."""
        archs = hf.get("architectures") or []
        if len(archs) != 1 or archs[0] not in ARCHITECTURES:
            raise ConfigError(f"config.json: architectures={archs!r} is not supported; known: {', '.join(ARCHITECTURES)}")
        arch = archs[0]
        if hf.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"config.json: hidden_act={hf['hidden_act']!r}: only 'silu' is supported")
        if hf.get("use_sliding_window"):
            raise ConfigError("config.json: use_sliding_window=true: sliding-window attention is not supported")
        if hf.get("mlp_bias"):
            raise ConfigError("config.json: mlp_bias=true is not supported")
        if hf.get("partial_rotary_factor", 1.0) != 1.0:
            raise ConfigError(f"config.json: partial_rotary_factor={hf['partial_rotary_factor']} is not supported")
        fields = {f.name for f in dataclasses.fields(cls)} - {"architecture", "hf_extra", "rope_scaling", "rope_theta",
                                                            "attention_out_bias", "qk_norm", "scoring_func"}
        kw: dict[str, Any] = {k: hf[k] for k in fields if k in hf and hf[k] is not None}
        kw["architecture"] = arch
        kw["hf_extra"] = {k: v for k, v in hf.items() if k not in fields and k not in _HF_CONSUMED}
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        kw["rope_theta"] = float(rope.pop("rope_theta", hf.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        kw["rope_scaling"] = rope if rope_type != "default" else None
        bias = bool(hf.get("attention_bias", False))
        if arch == "DeepseekV3ForCausalLM":
            if bias:
                raise ConfigError("config.json: attention_bias=true is not supported for DeepseekV3ForCausalLM")
            if hf.get("scoring_func", "sigmoid") != "sigmoid" or hf.get("topk_method", "noaux_tc") != "noaux_tc":
                raise ConfigError("config.json: DeepSeek-V3 needs scoring_func='sigmoid' and topk_method='noaux_tc'")
            if hf.get("moe_layer_freq", 1) != 1:
                raise ConfigError(f"config.json: moe_layer_freq={hf['moe_layer_freq']!r} is not supported: DeepSeek-V3's "
                                  "experts sit on every layer after first_k_dense_replace (moe_layer_freq=1)")
            kw["head_dim"] = None  # HF sets it to qk_rope_head_dim; MLA derives its own dims
            kw["scoring_func"] = "sigmoid"
        elif arch == "Qwen2ForCausalLM":
            kw["attention_bias"], kw["attention_out_bias"] = True, False
        else:
            kw["attention_bias"] = kw["attention_out_bias"] = bias
        if arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"):
            kw["qk_norm"] = True
        if arch == "Qwen3MoeForCausalLM":
            # transformers 5 writes num_local_experts, the hub configs num_experts
            kw["n_routed_experts"] = hf.get("num_experts") or hf.get("num_local_experts") or 0
            kw["scoring_func"] = "softmax"
            kw["norm_topk_prob"] = bool(hf.get("norm_topk_prob", False))
            kw.setdefault("mlp_only_layers", [])
        return cls(**kw)

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict for `architecture` that transformers (4.x legacy keys, 5.x) loads."""
        arch = self.architecture
        hf: dict[str, Any] = dict(self.hf_extra)
        hf.update(architectures=[arch], model_type=MODEL_TYPES[arch], hidden_act="silu",
                  vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                  num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
                  num_key_value_heads=self.num_key_value_heads, rms_norm_eps=self.rms_norm_eps,
                  rope_theta=self.rope_theta, rope_scaling=self.rope_scaling,
                  max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=self.tie_word_embeddings)
        if arch == "DeepseekV3ForCausalLM":
            hf.update(q_lora_rank=self.q_lora_rank, kv_lora_rank=self.kv_lora_rank,
                      qk_nope_head_dim=self.qk_nope_head_dim, qk_rope_head_dim=self.qk_rope_head_dim,
                      v_head_dim=self.v_head_dim, rope_interleave=self.rope_interleave, attention_bias=False,
                      n_routed_experts=self.n_routed_experts, n_shared_experts=self.n_shared_experts,
                      num_experts_per_tok=self.num_experts_per_tok, moe_intermediate_size=self.moe_intermediate_size,
                      n_group=self.n_group, topk_group=self.topk_group, routed_scaling_factor=self.routed_scaling_factor,
                      norm_topk_prob=self.norm_topk_prob, first_k_dense_replace=self.first_k_dense_replace,
                      scoring_func="sigmoid", topk_method="noaux_tc", moe_layer_freq=1,  # SGLang reads it
                      num_nextn_predict_layers=self.num_nextn_predict_layers)
            return hf
        hf["head_dim"] = self.head_dim
        if arch == "Qwen2ForCausalLM":
            if not self.attention_bias or self.attention_out_bias:
                raise ConfigError("Qwen2ForCausalLM has q/k/v biases and no output bias; this config differs")
        else:
            if self.attention_bias != self.attention_out_bias:
                raise ConfigError(f"{arch} has one attention_bias for q/k/v/o; this config sets them differently")
            hf["attention_bias"] = self.attention_bias
        if self.qk_norm != (arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")):
            raise ConfigError(f"qk_norm={self.qk_norm} does not match {arch}")
        if arch == "Qwen3MoeForCausalLM":
            hf.update(num_experts=self.n_routed_experts, num_experts_per_tok=self.num_experts_per_tok,
                      moe_intermediate_size=self.moe_intermediate_size, norm_topk_prob=self.norm_topk_prob,
                      decoder_sparse_step=self.decoder_sparse_step, mlp_only_layers=list(self.mlp_only_layers))
        elif self.n_routed_experts:
            raise ConfigError(f"{arch} is dense; this config has n_routed_experts={self.n_routed_experts}")
        return hf


# ---- presets (shapes only, no weights) ----------------------------------------------------------
def tiny_deepseek_v3(vocab_size: int = 512, **overrides) -> ModelConfig:
    """The embedded default: a ~1-3M-parameter DeepSeek-V3-style model that trains on a laptop CPU."""
    kw = dict(architecture="DeepseekV3ForCausalLM", vocab_size=vocab_size, hidden_size=128, intermediate_size=384,
              num_hidden_layers=4, num_attention_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32,
              qk_rope_head_dim=16, v_head_dim=32, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
              moe_intermediate_size=128, n_group=2, topk_group=1, routed_scaling_factor=1.0, first_k_dense_replace=1,
              max_position_embeddings=4096, tie_word_embeddings=False)
    return ModelConfig(**{**kw, **overrides})


def tiny_qwen2(vocab_size: int = 512, **overrides) -> ModelConfig:
    """A dense Qwen2-style model of the tiny default's size: GQA with q/k/v biases, tied embeddings."""
    kw = dict(architecture="Qwen2ForCausalLM", vocab_size=vocab_size, hidden_size=128, intermediate_size=384,
              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
              max_position_embeddings=4096, tie_word_embeddings=True)
    return ModelConfig(**{**kw, **overrides})


def qwen2_5_1_5b(**overrides) -> ModelConfig:
    kw = dict(architecture="Qwen2ForCausalLM", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
              num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2, rope_theta=1e6,
              max_position_embeddings=131072, tie_word_embeddings=True, attention_bias=True)
    return ModelConfig(**{**kw, **overrides})


def qwen2_5_7b(**overrides) -> ModelConfig:
    kw = dict(architecture="Qwen2ForCausalLM", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
              num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6,
              max_position_embeddings=131072, tie_word_embeddings=False, attention_bias=True)
    return ModelConfig(**{**kw, **overrides})


def qwen3_30b_a3b(**overrides) -> ModelConfig:
    kw = dict(architecture="Qwen3MoeForCausalLM", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
              num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128, rope_theta=1e6,
              max_position_embeddings=40960, qk_norm=True, n_routed_experts=128, num_experts_per_tok=8,
              moe_intermediate_size=768, norm_topk_prob=True, scoring_func="softmax")
    return ModelConfig(**{**kw, **overrides})


def deepseek_v3_671b(**overrides) -> ModelConfig:
    kw = dict(architecture="DeepseekV3ForCausalLM", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
              num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
              qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
              moe_intermediate_size=2048, n_group=8, topk_group=4, routed_scaling_factor=2.5, first_k_dense_replace=3,
              max_position_embeddings=163840, num_nextn_predict_layers=1,
              rope_scaling={"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
    return ModelConfig(**{**kw, **overrides})


PRESETS = {f.__name__: f for f in (tiny_deepseek_v3, tiny_qwen2, qwen2_5_1_5b, qwen2_5_7b, qwen3_30b_a3b,
                                   deepseek_v3_671b)}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name](**overrides)
