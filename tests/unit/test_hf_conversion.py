"""HF <-> native conversion: bit-exact round trips, saves that transformers loads with the same
logits, the conversion CLI, FP8 dequantisation, and clear errors on bad checkpoints."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from r1mega.models import Transformer, hf
from r1mega.models.checkpoint import CheckpointError, load_native, save_native
from r1mega.models.config import ModelConfig, tiny_deepseek_v3
from r1mega.models.hf.deepseek_v3 import dequantize_fp8
from tiny_models import load_hf, make_hf_dir

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import convert_hf  # noqa: E402


def read_all(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors directory, read with safetensors alone (independent of r1mega)."""
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for k in f.keys():
                assert k not in out
                out[k] = f.get_tensor(k)
    return out


@pytest.mark.parametrize("variant", ["deepseek_v3", "qwen3_moe", "qwen2"])
def test_round_trip_through_native_is_bit_exact(tmp_path, variant):
    src = make_hf_dir(variant, tmp_path / "hf")
    assert convert_hf.main(["to-native", str(src), str(tmp_path / "native"), "--max-shard-gb", "0.00002"]) == 0
    assert (tmp_path / "native" / "model.safetensors.index.json").exists()  # sharded
    assert convert_hf.main(["to-hf", str(tmp_path / "native"), str(tmp_path / "back")]) == 0
    a, b = read_all(src), read_all(tmp_path / "back")
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    # the native directory loads into the same model as the HF one
    native = load_native(tmp_path / "native")
    direct, _ = hf.load(src)
    for (ka, va), (kb, vb) in zip(native.state_dict().items(), direct.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


@pytest.mark.parametrize("variant,layout", [("deepseek_v3", "local"), ("qwen2", "te"), ("qwen3_moe", "local")])
def test_round_trip_through_megatron_is_bit_exact(tmp_path, variant, layout):
    src = make_hf_dir(variant, tmp_path / "hf")
    assert convert_hf.main(["to-megatron", str(src), str(tmp_path / "mcore"), "--layout", layout]) == 0
    names = set(read_all(tmp_path / "mcore"))
    assert "embedding.word_embeddings.weight" in names and not any(n.startswith("model.") for n in names)
    assert convert_hf.main(["megatron-to-native", str(tmp_path / "mcore"), str(tmp_path / "native")]) == 0
    assert convert_hf.main(["to-hf", str(tmp_path / "native"), str(tmp_path / "back")]) == 0
    a, b = read_all(src), read_all(tmp_path / "back")
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_megatron_to_native_refuses_a_directory_of_another_format(tmp_path):
    src = make_hf_dir("qwen2", tmp_path / "hf")
    assert convert_hf.main(["megatron-to-native", str(src), str(tmp_path / "never")]) == 1
    assert not (tmp_path / "never").exists()


def _random_model(config: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(config)
    model.init_weights(std=0.1)
    with torch.no_grad():  # non-trivial norms, biases and expert bias
        for name, t in model.state_dict().items():
            if name.endswith("bias") or "norm" in name:
                t.add_(0.1 * torch.randn_like(t))
    return model.eval()


SAVE_CONFIGS = {
    "tiny_deepseek_v3": lambda: tiny_deepseek_v3(vocab_size=97, num_hidden_layers=2),
    "deepseek_yarn": lambda: tiny_deepseek_v3(vocab_size=97, num_hidden_layers=2, q_lora_rank=None, max_position_embeddings=640,
                                              rope_scaling={"rope_type": "yarn", "factor": 20.0, "mscale": 1.0,
                                                            "mscale_all_dim": 0.707, "original_max_position_embeddings": 32}),
    "qwen2_tied": lambda: ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=97, hidden_size=32, intermediate_size=40,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      attention_bias=True, tie_word_embeddings=True, rope_theta=1e6),
    "qwen3_moe": lambda: ModelConfig(architecture="Qwen3MoeForCausalLM", vocab_size=97, hidden_size=32,
                                     intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=1, head_dim=16, qk_norm=True, n_routed_experts=4,
                                     num_experts_per_tok=2, moe_intermediate_size=8, scoring_func="softmax",
                                     norm_topk_prob=False, mlp_only_layers=[1]),
    "llama_bias": lambda: ModelConfig(architecture="LlamaForCausalLM", vocab_size=97, hidden_size=32, intermediate_size=40,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                      attention_bias=True, attention_out_bias=True),
}


@pytest.mark.parametrize("name", list(SAVE_CONFIGS))
def test_saved_model_loads_in_transformers(tmp_path, name):
    model = _random_model(SAVE_CONFIGS[name]())
    hf.save(model, tmp_path / "out", max_shard_bytes=50_000)
    ref = load_hf(tmp_path / "out")
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), ref(ids).logits, atol=1e-4, rtol=0)
    # and back into r1mega, identically
    again, config = hf.load(tmp_path / "out")
    assert config == model.config
    for (ka, va), (kb, vb) in zip(model.state_dict().items(), again.state_dict().items()):
        assert ka == kb and torch.equal(va, vb)


def test_native_save_load_round_trip(tmp_path):
    model = _random_model(tiny_deepseek_v3(vocab_size=50))
    save_native(model, tmp_path / "ckpt", max_shard_bytes=100_000)
    loaded = load_native(tmp_path / "ckpt")
    assert loaded.config == model.config
    sd = model.state_dict()
    assert set(sd) == set(loaded.state_dict())
    assert all(torch.equal(sd[k], v) for k, v in loaded.state_dict().items())
    with pytest.raises(FileExistsError):
        save_native(model, tmp_path / "ckpt")


def _edit(directory: Path, fn) -> None:
    file = directory / "model.safetensors"
    tensors = load_file(str(file))
    fn(tensors)
    save_file(tensors, str(file), metadata={"format": "pt"})


def test_bad_checkpoints_raise_naming_the_problem(tmp_path):
    src = make_hf_dir("deepseek_v3", tmp_path / "hf")
    name = "model.layers.1.mlp.experts.3.up_proj.weight"

    missing = tmp_path / "missing"
    missing.mkdir()
    for f in src.iterdir():
        (missing / f.name).write_bytes(f.read_bytes())
    _edit(missing, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        hf.load(missing)

    _edit(missing, lambda t: t.update({name: torch.zeros(3, 3)}))
    with pytest.raises(CheckpointError, match=rf"{name.replace('.', '[.]')} has shape \(3, 3\), expected \(16, 32\)"):
        hf.load(missing)

    _edit(missing, lambda t: t.update({name: torch.zeros(16, 32), "model.layers.0.self_attn.extra.weight": torch.zeros(1)}))
    with pytest.raises(CheckpointError, match="unexpected tensor model.layers.0.self_attn.extra.weight"):
        hf.load(missing)
    # a failed conversion leaves nothing behind
    assert convert_hf.main(["to-native", str(missing), str(tmp_path / "never")]) == 1
    assert not (tmp_path / "never").exists() and not list(tmp_path.glob(".never*"))

    cfg = json.loads((src / "config.json").read_text())
    cfg["architectures"] = ["MixtralForCausalLM"]
    (missing / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="MixtralForCausalLM"):
        hf.load(missing)


def test_fp8_weights_are_dequantised_by_block():
    torch.manual_seed(0)
    w = (torch.randn(5, 7) * 3).to(torch.float8_e4m3fn)
    scale_inv = torch.rand(3, 2) + 0.5  # blocks of 2 x 4
    got = dequantize_fp8(w, scale_inv, (2, 4))
    expected = torch.empty(5, 7)
    for r in range(5):
        for c in range(7):
            expected[r, c] = w[r, c].float() * scale_inv[r // 2, c // 4]
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected.to(torch.bfloat16), atol=0, rtol=0)


def test_load_pretrained_detects_the_format(tmp_path):
    from r1mega.models import load_pretrained

    src = make_hf_dir("qwen3", tmp_path / "hf")
    convert_hf.main(["to-native", str(src), str(tmp_path / "native"), "--dtype", "bfloat16"])
    a = load_pretrained(src)
    b = load_pretrained(tmp_path / "native", dtype=torch.bfloat16)
    assert b.embed.weight.dtype == torch.bfloat16
    torch.testing.assert_close(a.embed.weight.to(torch.bfloat16), b.embed.weight, atol=0, rtol=0)


# The DeepSeek-V3 hub config.json (legacy rope keys, FP8 quantisation, remote-code map).
DEEPSEEK_V3_HUB = {
    "architectures": ["DeepseekV3ForCausalLM"], "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"},
    "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3, "hidden_act": "silu",
    "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61, "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1, "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                            "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "tie_word_embeddings": False,
    "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16", "use_cache": True, "v_head_dim": 128,
    "vocab_size": 129280,
}


def test_hub_config_matches_preset_and_bad_configs_are_named():
    from r1mega.models.config import ConfigError, deepseek_v3_671b

    got = ModelConfig.from_hf(DEEPSEEK_V3_HUB)
    want = deepseek_v3_671b()
    assert {k: v for k, v in got.to_dict().items() if k != "hf_extra"} == \
        {k: v for k, v in want.to_dict().items() if k != "hf_extra"}
    assert "quantization_config" not in got.to_hf() and "auto_map" not in got.to_hf()
    assert got.cache_kv_heads == 1 and got.cache_k_head_dim == 576 and got.cache_v_head_dim == 512
    with pytest.raises(ConfigError, match="topk_group"):
        ModelConfig.from_hf({**DEEPSEEK_V3_HUB, "topk_group": 9})
    with pytest.raises(ConfigError, match="hidden_act"):
        ModelConfig.from_hf({**DEEPSEEK_V3_HUB, "hidden_act": "gelu"})
    with pytest.raises(ConfigError, match="moe_layer_freq=2"):
        ModelConfig.from_hf({**DEEPSEEK_V3_HUB, "moe_layer_freq": 2})
    with pytest.raises(ConfigError, match="num_key_value_heads"):
        ModelConfig(architecture="LlamaForCausalLM", num_attention_heads=4, num_key_value_heads=3)
