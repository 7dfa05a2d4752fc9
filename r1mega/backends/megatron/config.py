"""r1mega `ModelConfig` + megatron parallel sizes -> megatron-core `TransformerConfig` / `MLATransformerConfig`
and the `GPTModel` position-embedding arguments.

`transformer_config_kwargs` and `position_embedding` are pure (no megatron import), so they are tested
on CPU; `build_transformer_config` constructs the megatron object. Every choice below makes the
megatron model compute what the native `Transformer` computes:
- RMSNorm, SwiGLU (`gated_linear_unit` + SiLU, fc1 = [gate; up]), no dropout, no MLP biases;
  Qwen2's q/k/v biases through `add_qkv_bias`; Qwen3's per-head q/k norms through `qk_layernorm`;
- MLA: `qk_head_dim` = qk_nope_head_dim, `qk_pos_emb_head_dim` = qk_rope_head_dim, its q/kv latent
  norms through `qk_layernorm`, YaRN through `rope_type="yarn"` (same frequencies, attention factor
  and softmax mscale as r1mega.models.rope);
- MoE: `moe_layer_freq` lists exactly the layers `ModelConfig.is_moe_layer` makes sparse; DeepSeek-V3's
  sigmoid router with expert bias (aux-loss free, no aux loss), group-limited top-k and
  `routed_scaling_factor`; Qwen3-MoE's softmax top-k (`moe_router_pre_softmax` when the top-k weights
  are not renormalised); shared experts of n_shared_experts * moe_intermediate_size; router in fp32;
  routing replay available (`moe_enable_routing_replay`, used by policy.py only when asked).
Configurations megatron-core cannot reproduce exactly raise `ConfigError` naming the key.

Deliberately left out: pipeline and context parallelism, FP8, activation recomputation settings,
multi-token prediction; GQA rope frequencies are set on the built model (model.py), not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from r1mega.models.config import ConfigError, ModelConfig

# The q/kv latent norms of r1mega's MLA use this eps whatever rms_norm_eps says (as transformers does).
_MLA_LATENT_NORM_EPS = 1e-6


@dataclass(frozen=True)
class ParallelConfig:
    """megatron-core model-parallel sizes; data parallel is whatever world size is left."""

    tensor_parallel: int = 1
    expert_parallel: int = 1
    sequence_parallel: bool = False


def _need(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ConfigError(f"megatron backend: {key}={value!r}: {why}")


def _yarn(cfg: ModelConfig) -> dict[str, Any]:
    """YaRN parameters with r1mega.models.rope's defaults filled in."""
    rs = cfg.rope_scaling
    _need("attention_factor" not in rs, "rope_scaling.attention_factor", rs.get("attention_factor"),
          "an explicit YaRN attention factor has no megatron-core setting")
    old_len = rs.get("original_max_position_embeddings") or cfg.max_position_embeddings
    mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
    both = bool(mscale) and bool(mscale_all_dim)
    # r1mega's attention factor is mscale(f, mscale) / mscale(f, mscale_all_dim) only when both are set,
    # otherwise mscale(f): megatron reads (1.0, 0.0) and (None, None) that way.
    _need(both or not mscale_all_dim, "rope_scaling.mscale_all_dim", mscale_all_dim,
          "needs a non-zero mscale beside it for megatron-core to compute the same attention factor")
    return dict(factor=float(rs.get("factor") or cfg.max_position_embeddings / old_len), original=int(old_len),
                beta_fast=float(rs.get("beta_fast") or 32), beta_slow=float(rs.get("beta_slow") or 1),
                mscale=float(mscale) if both else None, mscale_all_dim=float(mscale_all_dim) if both else None,
                truncate=bool(rs.get("truncate", True)))


def _moe_kwargs(cfg: ModelConfig, parallel: ParallelConfig, use_te: bool) -> dict[str, Any]:
    k, e = cfg.num_experts_per_tok, cfg.n_routed_experts
    kw: dict[str, Any] = dict(
        num_moe_experts=e, moe_ffn_hidden_size=cfg.moe_intermediate_size, moe_router_topk=k,
        moe_layer_freq=[1 if cfg.is_moe_layer(i) else 0 for i in range(cfg.num_hidden_layers)],
        moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_router_dtype="fp32",
        # without expert parallelism there is nothing to exchange: the simpler all-gather dispatcher
        moe_token_dispatcher_type="alltoall" if parallel.expert_parallel > 1 else "allgather", moe_grouped_gemm=use_te,
        moe_router_topk_scaling_factor=cfg.routed_scaling_factor if cfg.routed_scaling_factor != 1.0 else None,
        moe_shared_expert_intermediate_size=(cfg.n_shared_experts * cfg.moe_intermediate_size
                                             if cfg.n_shared_experts else None),
        # each router gets a RouterReplay, idle (its own top-k) unless MegatronPolicy replays a record
        moe_enable_routing_replay=True)
    if cfg.scoring_func == "sigmoid":
        # megatron always renormalises sigmoid top-k weights when k > 1, and never when k == 1
        _need(cfg.norm_topk_prob and k > 1, "norm_topk_prob", cfg.norm_topk_prob,
              "megatron-core's sigmoid router renormalises the top-k weights exactly when top-k > 1")
        kw.update(moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                  moe_router_pre_softmax=False)
    else:
        # softmax over the top-k logits == renormalised top-k of the full softmax
        _need(k > 1 or not cfg.norm_topk_prob, "num_experts_per_tok", k,
              "megatron-core refuses top-1 softmax routing with renormalised weights")
        kw.update(moe_router_score_function="softmax", moe_router_enable_expert_bias=False,
                  moe_router_pre_softmax=not cfg.norm_topk_prob)
    if cfg.n_group > 1:
        # megatron scores a group by the sum of its top (k // topk_group) experts; r1mega (DeepSeek-V3) by its top 2
        group_size = e // cfg.n_group
        _need(k // cfg.topk_group == min(2, group_size), "topk_group", cfg.topk_group,
              f"megatron-core scores expert groups by their top num_experts_per_tok // topk_group = "
              f"{k // cfg.topk_group} experts; this model scores them by their top {min(2, group_size)}")
        kw.update(moe_router_num_groups=cfg.n_group, moe_router_group_topk=cfg.topk_group)
    return kw


def _mla_kwargs(cfg: ModelConfig) -> dict[str, Any]:
    _need(cfg.rms_norm_eps == _MLA_LATENT_NORM_EPS, "rms_norm_eps", cfg.rms_norm_eps,
          f"megatron-core uses one eps for every norm; r1mega's MLA latent norms use {_MLA_LATENT_NORM_EPS}")
    kw: dict[str, Any] = dict(
        multi_latent_attention=True, q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank,
        qk_head_dim=cfg.qk_nope_head_dim, qk_pos_emb_head_dim=cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
        rotary_base=cfg.rope_theta, rotary_percent=1.0, qk_layernorm=True)
    rs = cfg.rope_scaling
    if rs is not None and rs["rope_type"] == "yarn":
        y = _yarn(cfg)
        _need(y["truncate"], "rope_scaling.truncate", False, "megatron-core's MLA YaRN always rounds the ramp bounds")
        kw.update(rope_type="yarn", rotary_scaling_factor=y["factor"], original_max_position_embeddings=y["original"],
                  beta_fast=y["beta_fast"], beta_slow=y["beta_slow"],
                  mscale=y["mscale"] if y["mscale"] is not None else 1.0,
                  mscale_all_dim=y["mscale_all_dim"] if y["mscale_all_dim"] is not None else 0.0)
    else:
        # plain rope; linear/llama3 frequencies are set on the built layers (model.py). A scaling factor of 1
        # keeps megatron's softmax mscale at 1.
        kw.update(rope_type="rope", rotary_scaling_factor=1.0, mscale=1.0, mscale_all_dim=0.0)
    return kw


def transformer_config_kwargs(cfg: ModelConfig, parallel: ParallelConfig = ParallelConfig(), *,
                              dtype: torch.dtype = torch.bfloat16, use_te: bool = False) -> dict[str, Any]:
    """Keyword arguments of megatron's (MLA)TransformerConfig for `cfg`; raises ConfigError where the
    megatron model could not compute the same function."""
    _need(not cfg.attention_out_bias, "attention_out_bias", True,
          "megatron-core ties the attention output bias to MLP biases (add_bias_linear), which r1mega has none of")
    _need(cfg.vocab_size % parallel.tensor_parallel == 0, "vocab_size", cfg.vocab_size,
          f"must be divisible by tensor_parallel={parallel.tensor_parallel} (pad the vocabulary)")
    _need(use_te or not parallel.sequence_parallel, "sequence_parallel", True,
          "needs Transformer Engine (torch norms do not support it)")
    kw: dict[str, Any] = dict(
        num_layers=cfg.num_hidden_layers, hidden_size=cfg.hidden_size, num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.intermediate_size or cfg.moe_intermediate_size, normalization="RMSNorm",
        layernorm_epsilon=cfg.rms_norm_eps, gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, attention_softmax_in_fp32=True, masked_softmax_fusion=False,
        bias_activation_fusion=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        tensor_model_parallel_size=parallel.tensor_parallel, expert_model_parallel_size=parallel.expert_parallel,
        sequence_parallel=parallel.sequence_parallel, use_cpu_initialization=False, init_method_std=0.02)
    if cfg.is_mla:
        kw.update(_mla_kwargs(cfg))
    else:
        kw.update(kv_channels=cfg.head_dim, num_query_groups=cfg.num_key_value_heads,
                  add_qkv_bias=cfg.attention_bias, qk_layernorm=cfg.qk_norm)
    if cfg.n_routed_experts:
        kw.update(_moe_kwargs(cfg, parallel, use_te))
    return kw


def position_embedding(cfg: ModelConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(GPTModel keyword arguments, extra TransformerConfig attributes) for the rotary embedding.

    MLA builds its rotary embedding inside each attention layer from the config (GPTModel skips "rope"
    for MLA). GQA
    uses megatron's "rope" (frequencies replaced on the built model by r1mega's, model.py) or, for
    YaRN, "yarn" with the `yarn_*` config attributes GPTModel and the attention layer read."""
    if cfg.is_mla:
        return dict(position_embedding_type="rope", rotary_base=cfg.rope_theta), {}
    base = dict(rotary_percent=1.0, rotary_base=cfg.rope_theta)
    rs = cfg.rope_scaling
    if rs is None or rs["rope_type"] != "yarn":
        return dict(position_embedding_type="rope", **base), {}
    y = _yarn(cfg)
    extra = dict(yarn_rotary_scaling_factor=y["factor"], yarn_original_max_position_embeddings=y["original"],
                 yarn_beta_fast=y["beta_fast"], yarn_beta_slow=y["beta_slow"], yarn_mscale=y["mscale"],
                 yarn_mscale_all_dim=y["mscale_all_dim"], yarn_correction_range_round_to_int=y["truncate"])
    return dict(position_embedding_type="yarn", **base), extra


def build_transformer_config(cfg: ModelConfig, parallel: ParallelConfig = ParallelConfig(), *,
                             dtype: torch.dtype = torch.bfloat16, use_te: bool = False):
    """The megatron-core config object for `cfg` (MLATransformerConfig for DeepSeek-V3)."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

    kw = transformer_config_kwargs(cfg, parallel, dtype=dtype, use_te=use_te)
    config = (MLATransformerConfig if cfg.is_mla else TransformerConfig)(**kw)
    for key, value in position_embedding(cfg)[1].items():
        setattr(config, key, value)  # read with getattr by GPTModel / Attention; no dataclass field for them
    return config
