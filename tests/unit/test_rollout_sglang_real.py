"""The SGLang adapter against SGLang's own code, on the CPU (install: python tools/install_sglang_cpu.py).

Run here: SGLang's request classes (io_struct's GenerateReqInput, its SamplingParams with `verify`)
built from the adapter's payloads; its serialiser after `ipc_serializer()` and its `SafeUnpickler`
reading the buckets the adapter sends; its `FlattenedTensorBucket` reconstruction; and its DeepSeek
weight loader (`DeepseekV2WeightLoaderMixin.do_load_weights`, the code behind
`update_weights_from_tensor`) fed bucket by bucket at every bucket size.

The loader runs on a stand-in module holding only the parameters it writes for the attention's
fused projection and plain parameters (SGLang's real DeepseekV2ForCausalLM needs its distributed
state and sgl-kernel to be built); its `post_load_weights` (kv_b_proj's split into w_kc / w_vc) is
a no-op there. Not run here: SGLang's Engine (on CPU it needs sgl-kernel's CPU ops, which PyPI does
not carry: see README), Qwen2's loader (its QKV/gate-up layers need SGLang's tensor-parallel state).
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn as nn

from r1mega.rollout.engine import SamplingParams
from r1mega.rollout.sglang_protocol import (FlatMeta, bucket_payloads, expand, flat_buckets, flatten,
                                            sglang_sampling)
from sglang_cpu import SKIP_REASON

pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")

LAYERS, HIDDEN, Q_LORA, KV_A = 3, 4, 8, 6  # kv_a_proj_with_mqa rows: kv_lora_rank + qk_rope_head_dim


@pytest.fixture
def sglang_serializer():
    """ipc_serializer()'s (serialize, metadata class), with torch's own tensor reduction back for the test:
    SGLang's patch rewrites a CUDA handle's device field (argument 6) and fails on a CPU tensor's
    shorter one, so CPU tensors serialise only without it. The patch's presence is checked first."""
    from torch.multiprocessing import reductions

    from r1mega.rollout.sglang_engine import ipc_serializer

    serializer = ipc_serializer()
    assert hasattr(reductions, "_reduce_tensor_original")  # SGLang's device-by-UUID patch is applied
    reductions.reduce_tensor = reductions._reduce_tensor_original
    reductions.init_reductions()
    yield serializer
    # Torch as the test found it, unpatched: later tests pickle CPU tensors (the next ipc_serializer() patches again).
    reductions.rebuild_cuda_tensor = reductions._rebuild_cuda_tensor_original
    del reductions._reduce_tensor_original, reductions._rebuild_cuda_tensor_original
    reductions.init_reductions()


def sglang_deserialize(payload: str):
    from sglang.srt.utils import MultiprocessingSerializer

    return MultiprocessingSerializer.deserialize(payload)  # SGLang's SafeUnpickler


# ---- requests
def test_requests_are_accepted_by_sglangs_request_and_sampling_classes():
    from sglang.srt.managers.io_struct import GenerateReqInput
    from sglang.srt.sampling.sampling_params import SamplingParams as SGLangSampling

    params = [SamplingParams(n=2, temperature=0.7, top_p=0.9, top_k=5, max_new_tokens=7, stop_token_ids=[3],
                             stop=["ab"], seed=11),
              SamplingParams(temperature=0.0, max_new_tokens=4)]
    pending = [x for i, p in enumerate(params) for x in expand(i, [1, 2, 3], p, send_seed=True, default_seed=lambda: 5)]
    batch = GenerateReqInput(input_ids=[x.request["input_ids"] for x in pending],
                             sampling_params=[x.request["sampling_params"] for x in pending], return_logprob=True)
    batch.normalize_batch_and_arguments()
    assert batch.batch_size == 3 and all(batch.return_logprob)
    sampled, greedy = (SGLangSampling(**x.request["sampling_params"]) for x in (pending[0], pending[2]))
    for sp in (sampled, greedy):
        sp.verify(vocab_size=32)  # raises on anything SGLang refuses
    assert (sampled.temperature, sampled.top_p, sampled.top_k, sampled.max_new_tokens) == (0.7, 0.9, 5, 7)
    assert sampled.sampling_seed == pending[0].request["sampling_params"]["sampling_seed"]
    assert sampled.stop_token_ids == {3} and sampled.ignore_eos is False
    # greedy: SGLang samples the argmax at temperature 1, so its logprob is log softmax(logits), as Sample's
    assert (greedy.temperature, greedy.top_k, greedy.ignore_eos) == (1.0, 1, True)
    off = SGLangSampling(**sglang_sampling(SamplingParams(top_k=0)))
    off.verify(vocab_size=32)  # top_k 0 (off) is sent as SGLang's -1


# ---- weights: serialiser, unpickler, flattened bucket
def test_buckets_pass_sglangs_unpickler_and_rebuild_to_the_same_tensors(sglang_serializer):
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    serialize, metadata_cls = sglang_serializer
    named = [("a.weight", torch.randn(3, 5)), ("b.weight", torch.randn(7)), ("c.weight", torch.randn(2, 2, 2))]
    flat, metas = flatten(named)
    payloads = bucket_payloads(flat, metas, 2, serialize, metadata_cls)
    assert len(payloads) == 2
    for payload in payloads:
        data = sglang_deserialize(payload)
        rebuilt = FlattenedTensorBucket(flattened_tensor=data["flattened_tensor"],
                                        metadata=data["metadata"]).reconstruct_tensors()
        assert [n for n, _ in rebuilt] == [n for n, _ in named]
        assert all(torch.equal(t, ref) for (_, t), (_, ref) in zip(rebuilt, named))
    # the payload's classes must be on SGLang's allow-list: a class of ours is refused, SimpleNamespace is not
    with pytest.raises(RuntimeError, match="Blocked unsafe global"):
        sglang_deserialize(bucket_payloads(flat, metas, 1, serialize, FlatMeta)[0])
    sglang_deserialize(bucket_payloads(flat, metas, 1, serialize, types.SimpleNamespace)[0])


# ---- weights: SGLang's DeepSeek loader
def loader_stand_in():
    """A module with the parameters SGLang's DeepSeek loader writes for these names, using its loader."""
    import transformers
    from sglang.srt.models.deepseek_common.deepseek_weight_loader import DeepseekV2WeightLoaderMixin

    config = transformers.DeepseekV3Config(q_lora_rank=Q_LORA, kv_lora_rank=4, num_hidden_layers=LAYERS,
                                           n_routed_experts=4, num_nextn_predict_layers=0)

    class StandIn(nn.Module, DeepseekV2WeightLoaderMixin):
        def __init__(self):
            super().__init__()
            self.config, self.quant_config, self.num_fused_shared_experts = config, None, 0
            self.pp_group = types.SimpleNamespace(is_last_rank=True)
            self.model = nn.Module()
            self.model.start_layer, self.model.end_layer = 0, LAYERS
            self.model.layers = nn.ModuleList()
            for _ in range(LAYERS):
                layer = nn.Module()
                layer.self_attn = nn.Module()
                layer.self_attn.fused_qkv_a_proj_with_mqa = nn.Linear(HIDDEN, Q_LORA + KV_A, bias=False)
                layer.self_attn.q_a_layernorm = nn.LayerNorm(Q_LORA, bias=False)
                self.model.layers.append(layer)
            self.model.norm = nn.LayerNorm(HIDDEN, bias=False)
            for p in self.parameters():
                nn.init.zeros_(p)

        def post_load_weights(self, **kwargs):  # kv_b_proj's split: no kv_b_proj here
            pass

    return StandIn()


def hf_attention_stream(generator):
    """HF names in the order a checkpoint lists them: per layer q_a, its norm, then kv_a (never adjacent)."""
    stream = []
    for i in range(LAYERS):
        prefix = f"model.layers.{i}.self_attn."
        stream += [(prefix + "q_a_proj.weight", torch.randn(Q_LORA, HIDDEN, generator=generator)),
                   (prefix + "q_a_layernorm.weight", torch.randn(Q_LORA, generator=generator)),
                   (prefix + "kv_a_proj_with_mqa.weight", torch.randn(KV_A, HIDDEN, generator=generator))]
    return stream + [("model.norm.weight", torch.randn(HIDDEN, generator=generator))]


def expected_parameters(stream):
    """What every stand-in parameter must hold after loading `stream` (the fusion written out by hand)."""
    named = dict(stream)
    expected = {"model.norm.weight": named["model.norm.weight"]}
    for i in range(LAYERS):
        prefix = f"model.layers.{i}.self_attn."
        expected[prefix + "fused_qkv_a_proj_with_mqa.weight"] = torch.cat(
            [named[prefix + "q_a_proj.weight"], named[prefix + "kv_a_proj_with_mqa.weight"]])
        expected[prefix + "q_a_layernorm.weight"] = named[prefix + "q_a_layernorm.weight"]
    return expected


def send(model, stream, bucket_bytes, serialize, metadata_cls):
    """What update_weights + SGLang's update_weights_from_tensor do: one load_weights call per bucket."""
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket

    calls = 0
    for bucket in flat_buckets(iter(stream), bucket_bytes):
        data = sglang_deserialize(bucket_payloads(*flatten(bucket), 1, serialize, metadata_cls)[0])
        model.do_load_weights(FlattenedTensorBucket(flattened_tensor=data["flattened_tensor"],
                                                    metadata=data["metadata"]).reconstruct_tensors())
        calls += 1
    return calls


def test_sglangs_loader_leaves_the_fused_projection_stale_when_a_call_splits_the_pair():
    stream = hf_attention_stream(torch.Generator().manual_seed(0))
    model = loader_stand_in()
    for pair in stream:  # one tensor per call: what plain size-only buckets of one tensor each would do
        model.do_load_weights([pair])
    fused = dict(model.named_parameters())["model.layers.0.self_attn.fused_qkv_a_proj_with_mqa.weight"]
    assert torch.count_nonzero(fused) == 0  # never written: the reason buckets keep the pair together


@pytest.mark.parametrize("bucket_bytes", [1, 100, 150, 250, 400, 1 << 20])
def test_every_bucket_size_leaves_no_stale_parameter_in_sglangs_loader(bucket_bytes, sglang_serializer):
    serialize, metadata_cls = sglang_serializer
    stream = hf_attention_stream(torch.Generator().manual_seed(bucket_bytes))
    model = loader_stand_in()
    calls = send(model, stream, bucket_bytes, serialize, metadata_cls)
    assert calls >= (1 if bucket_bytes >= 1 << 20 else 2)
    params = dict(model.named_parameters())
    expected = expected_parameters(stream)
    assert set(params) == set(expected)
    for name, value in expected.items():
        assert torch.equal(params[name], value), name  # bit-exact: the loader copies


def test_an_update_with_half_a_fused_pair_is_refused():
    stream = [(n, t) for n, t in hf_attention_stream(torch.Generator().manual_seed(0))
              if n != "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"]
    with pytest.raises(ValueError, match="layers.1.self_attn.q_a_proj.weight arrived without"):
        list(flat_buckets(iter(stream), 1 << 20))
