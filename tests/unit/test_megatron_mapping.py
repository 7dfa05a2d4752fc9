"""megatron backend on CPU: native <-> megatron mapping round trips for every architecture and both
module layouts, the fused layouts checked against megatron's own way of splitting them (plain torch),
tensor-parallel shards, config translation and its refusals, and the missing-megatron-core message
(models built by megatron-core itself: test_megatron_backend_cpu.py)."""

import dataclasses
import sys

import pytest
import torch
import torch.nn.functional as F

from r1mega.backends.megatron import config as mconfig, mapping
from r1mega.models import rope
from r1mega.models.config import ConfigError, ModelConfig, tiny_deepseek_v3
from r1mega.models.transformer import Transformer
from tiny_models import VARIANTS, hf_config


def native_config(variant: str) -> ModelConfig:
    c = hf_config(variant)
    d = c.to_dict()
    d["architectures"] = [type(c).__name__.replace("Config", "ForCausalLM")]
    return ModelConfig.from_hf(d)


def random_native(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(t.shape, generator=g) for n, t in Transformer(cfg).state_dict().items()}


@pytest.mark.parametrize("layout", [mapping.LOCAL, mapping.TE], ids=["local", "te"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_round_trip_is_exact(variant, layout):
    cfg = native_config(variant)
    native = random_native(cfg)
    meg = dict(mapping.native_to_megatron(cfg, native.items(), layout))
    assert sorted(meg) == sorted(mapping.megatron_names(cfg, layout))
    back = dict(mapping.megatron_to_native(cfg, meg.items(), layout))
    assert back.keys() == native.keys()
    for name, t in native.items():
        assert torch.equal(back[name], t), name


def test_hf_round_trip_and_extra_state_skipped():
    cfg = native_config("deepseek_v3")
    from r1mega.models.hf import native_to_hf

    hf = dict(native_to_hf(cfg, random_native(cfg).items()))
    meg = list(mapping.hf_to_megatron(cfg, hf.items(), mapping.TE))
    meg.append(("decoder.layers.0.self_attention.linear_proj._extra_state", torch.empty(0)))
    back = dict(mapping.megatron_to_hf(cfg, meg, mapping.TE))
    assert back.keys() == hf.keys() and all(torch.equal(back[k], v) for k, v in hf.items())


def test_gqa_fused_qkv_and_swiglu_as_megatron_splits_them():
    cfg = native_config("qwen2")  # 4 heads, 2 kv heads, q/k/v biases
    nat = random_native(cfg)
    meg = dict(mapping.native_to_megatron(cfg, nat.items()))
    x = torch.randn(5, cfg.hidden_size)
    a = "decoder.layers.1.self_attention.linear_qkv."
    mixed = x @ meg[a + "weight"].T + meg[a + "bias"]  # megatron: [s, ng * (np/ng + 2) * hn]
    ng, hd, per = cfg.num_key_value_heads, cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
    q, k, v = mixed.view(5, ng, (per + 2) * hd).split([per * hd, hd, hd], dim=2)
    lin = lambda p: x @ nat[f"layers.1.attn.{p}.weight"].T + nat[f"layers.1.attn.{p}.bias"]  # noqa: E731
    torch.testing.assert_close(q.reshape(5, -1), lin("wq"))
    torch.testing.assert_close(k.reshape(5, -1), lin("wk"))
    torch.testing.assert_close(v.reshape(5, -1), lin("wv"))
    gate, up = (x @ meg["decoder.layers.0.mlp.linear_fc1.weight"].T).chunk(2, dim=-1)  # megatron's glu
    torch.testing.assert_close(F.silu(gate) * up, F.silu(x @ nat["layers.0.ffn.gate.weight"].T)
                               * (x @ nat["layers.0.ffn.up.weight"].T))


@pytest.mark.parametrize("interleave", [True, False])
def test_mla_rope_rows_give_native_rotation(interleave):
    cfg = tiny_deepseek_v3(vocab_size=32, num_hidden_layers=1, rope_interleave=interleave)
    nat = random_native(cfg)
    meg = dict(mapping.native_to_megatron(cfg, nat.items()))
    n, nope, r = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    latent = torch.randn(1, 6, cfg.q_lora_rank)
    cos, sin = rope.cos_sin(cfg, torch.arange(6)[None], torch.float32)  # [1, 6, r/2]
    native_q = (latent @ nat["layers.0.attn.wq_b.weight"].T).view(1, 6, n, -1)[..., nope:]
    want = rope.apply(native_q, cos, sin, interleaved=interleave)
    # megatron's MLA: de-interleave the rope dims (x[0::2], x[1::2]), then rotate halves with cat(cos, cos)
    t = (latent @ meg["decoder.layers.0.self_attention.linear_q_up_proj.weight"].T).view(1, 6, n, -1)[..., nope:]
    t = torch.cat([t[..., 0::2], t[..., 1::2]], dim=-1)
    c, s = torch.cat([cos, cos], -1)[:, :, None], torch.cat([sin, sin], -1)[:, :, None]
    got = t * c + torch.cat([-t[..., r // 2:], t[..., : r // 2]], dim=-1) * s
    torch.testing.assert_close(got, want)


def test_tp_shards_reassemble():
    cfg = native_config("qwen2")
    meg = dict(mapping.native_to_megatron(cfg, random_native(cfg).items()))
    fc1 = "decoder.layers.0.mlp.linear_fc1.weight"
    shards = [mapping.tp_shard(cfg, fc1, meg[fc1], r, 2) for r in range(2)]
    gate, up = meg[fc1].chunk(2)
    assert torch.equal(shards[1], torch.cat([gate.chunk(2)[1], up.chunk(2)[1]]))
    proj = "decoder.layers.0.self_attention.linear_proj.weight"
    assert torch.equal(torch.cat([mapping.tp_shard(cfg, proj, meg[proj], r, 2) for r in range(2)], 1), meg[proj])
    norm = "decoder.final_layernorm.weight"
    assert mapping.tp_shard(cfg, norm, meg[norm], 1, 2) is meg[norm]
    qkv = "decoder.layers.0.self_attention.linear_qkv.weight"
    with pytest.raises(Exception, match="num_key_value_heads"):
        mapping.tp_shard(cfg, qkv, meg[qkv], 0, 4)
    cfg = dataclasses.replace(cfg, vocab_size=96)  # the vocabulary splits over 2 ranks
    meg = dict(mapping.native_to_megatron(cfg, random_native(cfg).items()))
    for name, t in meg.items():  # tp_unshard undoes tp_shard for every tensor of the model
        pieces = [mapping.tp_shard(cfg, name, t, r, 2) for r in range(2)]
        assert torch.equal(mapping.tp_unshard(name, pieces), t), name
        assert mapping.is_tp_sharded(name) == (pieces[0].numel() < t.numel()), name


def test_tp_unshard_of_deepseek_experts_and_mla():
    cfg = tiny_deepseek_v3(vocab_size=64)
    meg = dict(mapping.native_to_megatron(cfg, random_native(cfg).items()))
    for name, t in meg.items():
        assert torch.equal(mapping.tp_unshard(name, [mapping.tp_shard(cfg, name, t, r, 2) for r in range(2)]), t), name


def test_missing_and_unknown_tensors_are_named():
    cfg = native_config("llama")
    nat = random_native(cfg)
    with pytest.raises(ValueError, match="layers.0.attn.wv.weight"):
        list(mapping.native_to_megatron(cfg, ((n, t) for n, t in nat.items() if n != "layers.0.attn.wv.weight")))
    with pytest.raises(ValueError, match="bogus"):
        list(mapping.megatron_to_native(cfg, [("bogus", torch.zeros(1))]))


def test_config_kwargs_match_the_model():
    ds = mconfig.transformer_config_kwargs(tiny_deepseek_v3(routed_scaling_factor=2.5))
    assert ds["moe_layer_freq"] == [0, 1, 1, 1] and ds["moe_router_score_function"] == "sigmoid"
    assert ds["moe_router_enable_expert_bias"] and ds["moe_router_topk_scaling_factor"] == 2.5
    assert (ds["qk_head_dim"], ds["qk_pos_emb_head_dim"], ds["v_head_dim"]) == (32, 16, 32)
    assert ds["moe_shared_expert_intermediate_size"] == 128 and ds["hidden_dropout"] == 0.0
    qm = mconfig.transformer_config_kwargs(native_config("qwen3_moe_unnormed"))
    assert qm["moe_router_pre_softmax"] and qm["moe_router_score_function"] == "softmax" and qm["qk_layernorm"]
    q2 = mconfig.transformer_config_kwargs(native_config("qwen2"))
    assert q2["add_qkv_bias"] and not q2["add_bias_linear"] and q2["num_query_groups"] == 2
    _, extra = mconfig.position_embedding(native_config("qwen2_yarn"))
    assert extra["yarn_rotary_scaling_factor"] == 4.0 and extra["yarn_mscale"] is None


@pytest.mark.parametrize("variant,key", [("deepseek_v3", "topk_group"), ("llama_bias_tied_mha", "attention_out_bias")])
def test_config_refuses_what_megatron_computes_differently(variant, key):
    # deepseek_v3 here: top-2 of 8 experts in 4 groups keeping 2: megatron scores groups by their top 1
    with pytest.raises(ConfigError, match=key):
        mconfig.transformer_config_kwargs(native_config(variant))


def test_missing_megatron_core_says_how_to_install(monkeypatch):
    import r1mega.backends.megatron as mb

    monkeypatch.setitem(sys.modules, "megatron", None)  # makes `import megatron.core` raise ImportError
    monkeypatch.setitem(sys.modules, "megatron.core", None)
    with pytest.raises(ImportError, match=r"pip install r1mega\[megatron\]"):
        mb.build_model  # noqa: B018
    assert mb.native_to_megatron is mapping.native_to_megatron  # the mapping needs no megatron-core
