"""The SGLang adapter against SGLang's own code, on the CPU (install: python tools/install_sglang_cpu.py).

Run here: SGLang's request classes (io_struct's GenerateReqInput, its SamplingParams with `verify`)
built from the adapter's payloads, and the fake server's sampling rules against SGLang's; its serialiser after `ipc_serializer()` and its `SafeUnpickler`
reading the buckets the adapter sends; its `FlattenedTensorBucket` reconstruction; and SGLang's own
DeepseekV2ForCausalLM and Qwen2ForCausalLM, built from the config.json the engine's launch writes, in
SGLang's one-process tensor-parallel world, loading every update through its ModelRunner's
flattened-bucket path (the code behind `update_weights_from_tensor`) at every bucket size.

Not run here: SGLang's Engine and any forward pass (on the CPU they need sgl-kernel's CPU ops, which
PyPI does not carry: see README).
"""

from __future__ import annotations

import re
import types

import pytest
import torch

from r1mega.models.config import tiny_deepseek_v3, tiny_qwen2
from r1mega.models.hf import save
from r1mega.models.transformer import Transformer
from r1mega.rollout.engine import SamplingParams
from r1mega.rollout.sglang import SGLangEngine
from r1mega.rollout.sglang_protocol import (GREEDY_BELOW, FlatMeta, bucket_payloads, expand, flat_buckets, flatten,
                                            sglang_sampling, to_hf)
from sglang_cpu import SKIP_REASON
from sglang_rules import sglang_sampling_rules

pytestmark = pytest.mark.skipif(SKIP_REASON is not None, reason=SKIP_REASON or "")


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


SAMPLING_GRID = [dict(temperature=t) for t in (None, 0.0, 5e-7, 1e-6, 0.6, 1.0, -0.1, float("inf"), float("nan"))] + \
    [dict(top_p=p) for p in (None, 0.0, 0.3, 1.0, 1.2)] + [dict(top_k=k) for k in (None, -2, -1, 0, 1, 7)] + \
    [dict(sampling_seed=x) for x in (None, 0, -2**63, 2**63 - 1, 2**63, 1.5)] + \
    [dict(max_new_tokens=m) for m in (-1, 0, 5)] + [dict(temperature=0.0, top_k=9)]


@pytest.mark.parametrize("fields", SAMPLING_GRID, ids=repr)
def test_the_fake_servers_sampling_rules_are_sglangs(fields):
    """The fake server (test_rollout_sglang.py) accepts, refuses and normalises as SGLang's SamplingParams."""
    from sglang.srt.sampling.sampling_params import TOP_K_ALL
    from sglang.srt.sampling.sampling_params import SamplingParams as SGLangSampling

    try:
        theirs = SGLangSampling(**fields)
        theirs.verify(vocab_size=32)
    except ValueError as e:
        with pytest.raises(ValueError, match=re.escape(str(e).split(",")[0])):
            sglang_sampling_rules(fields)
        return
    ours = sglang_sampling_rules(fields)
    assert ours == {"temperature": theirs.temperature, "top_p": theirs.top_p,
                    "top_k": -1 if theirs.top_k == TOP_K_ALL else theirs.top_k, "sampling_seed": theirs.sampling_seed}


def test_the_adapters_greedy_threshold_is_sglangs():
    from sglang.srt.sampling.sampling_params import _SAMPLING_EPS

    assert GREEDY_BELOW == _SAMPLING_EPS


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


# ---- weights: SGLang's own models and loaders
@pytest.fixture(scope="module")
def world():
    from sglang_cpu import sglang_world

    with sglang_world():
        yield


CONFIGS = {"deepseek_v3": tiny_deepseek_v3, "qwen2": tiny_qwen2}


def checkpoint(variant, tmp_path):
    """A native policy of the tiny preset (random weights) and SGLang's model built from the config.json
    the SGLang engine's launch writes for it (`save`)."""
    from sglang_cpu import sglang_model

    torch.manual_seed(0)
    policy = Transformer(CONFIGS[variant]())
    save(policy, tmp_path / "model")
    return policy, sglang_model(tmp_path / "model")


class SchedulerEnd:
    """The scheduler's side of `update_weights_from_tensor(load_format="flattened_bucket")`, in SGLang's own
    code: tp rank 0's payload through its SafeUnpickler, then its ModelRunner weight updater, which rebuilds
    the bucket and calls the model's `load_weights` once per request."""

    def __init__(self, model):
        self.model, self.requests = model, 0

    def update_weights_from_tensor(self, payloads, load_format):
        from sglang.srt.model_executor.model_runner_components.weight_updater import WeightUpdater

        assert load_format == "flattened_bucket"
        runner = types.SimpleNamespace(get_model=lambda: self.model)
        assert WeightUpdater._update_weights_from_flattened_bucket(runner, sglang_deserialize(payloads[0]))[0]
        self.requests += 1

    def flush_cache(self, timeout_s):
        pass


def fused_by_hand(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What SGLang's model must hold after loading HF tensors `hf`: its fused layers written out by hand
    (q/k/v into qkv_proj, gate/up into gate_up_proj, DeepSeek's q_a/kv_a into fused_qkv_a_proj_with_mqa,
    experts stacked into w13 = [gate; up] and w2 = down)."""
    fused = {"q_proj": ("qkv_proj", ("q_proj", "k_proj", "v_proj")),
             "gate_proj": ("gate_up_proj", ("gate_proj", "up_proj")),
             "q_a_proj": ("fused_qkv_a_proj_with_mqa", ("q_a_proj", "kv_a_proj_with_mqa"))}
    parts = {part for _, members in fused.values() for part in members}
    want, experts = {}, {}
    for name, tensor in hf.items():
        *module, leaf, kind = name.split(".")
        if "experts" in module and module[-1].isdigit():  # mlp.experts.<e>.<leaf>.weight
            experts.setdefault(".".join(module[:-1]), {}).setdefault(leaf, {})[int(module[-1])] = tensor
        elif leaf in fused:
            target, members = fused[leaf]
            want[".".join([*module, target, kind])] = torch.cat([hf[".".join([*module, m, kind])] for m in members])
        elif leaf not in parts:
            want[name] = tensor
    for prefix, by_leaf in experts.items():
        count = len(by_leaf["down_proj"])
        want[prefix + ".w13_weight"] = torch.stack(
            [torch.cat([by_leaf["gate_proj"][e], by_leaf["up_proj"][e]]) for e in range(count)])
        want[prefix + ".w2_weight"] = torch.stack([by_leaf["down_proj"][e] for e in range(count)])
    return want


def hf_tensors(policy):
    return {n: t.detach().clone() for n, t in to_hf(policy.config, policy.state_dict().items())}


def test_sglangs_deepseek_loader_leaves_the_fused_projection_stale_when_a_call_splits_the_pair(world, tmp_path):
    policy, model = checkpoint("deepseek_v3", tmp_path)
    for pair in hf_tensors(policy).items():  # one tensor per call: what size-only one-tensor buckets would do
        model.load_weights([pair])
    params = dict(model.named_parameters())
    assert torch.isnan(params["model.layers.0.self_attn.fused_qkv_a_proj_with_mqa.weight"]).all()  # never written
    assert not torch.isnan(params["model.layers.0.self_attn.q_b_proj.weight"]).any()


@pytest.mark.parametrize("bucket_bytes", [1, 64 << 10, 1 << 30])
@pytest.mark.parametrize("variant", list(CONFIGS))
def test_a_weight_update_rewrites_every_parameter_of_sglangs_own_model(world, tmp_path, sglang_serializer,
                                                                      variant, bucket_bytes):
    policy, model = checkpoint(variant, tmp_path)
    end = SchedulerEnd(model)
    engine = SGLangEngine(end, config=policy.config, dtype=torch.float32, bucket_bytes=bucket_bytes,
                          serializer=sglang_serializer)
    engine.update_weights(policy.state_dict().items(), version=1)
    assert end.requests > 1 if bucket_bytes < 1 << 30 else end.requests == 1
    params = dict(model.named_parameters())
    want = fused_by_hand(hf_tensors(policy))
    assert set(params) == set(want)
    if policy.config.tie_word_embeddings:  # why to_hf sends no lm_head.weight: SGLang's is the embedding
        assert model.lm_head.weight is model.model.embed_tokens.weight
    for name, value in want.items():
        assert torch.equal(params[name], value), name  # bit-exact: the loaders copy
    if variant == "deepseek_v3":  # absorbed MLA's kv_b_proj halves, made by post_load_weights per request
        for layer, decoder in enumerate(model.model.layers):
            attn = decoder.self_attn
            kv_b = want[f"model.layers.{layer}.self_attn.kv_b_proj.weight"].unflatten(0, (attn.num_local_heads, -1))
            k_nope, v = kv_b.split([attn.qk_nope_head_dim, attn.v_head_dim], dim=1)  # (heads, rows, kv_lora)
            assert torch.equal(attn.w_kc, k_nope), layer  # q_nope @ w_kc: into the latent
            assert torch.equal(attn.w_vc, v.transpose(1, 2)), layer  # latent @ w_vc: out to v


def test_an_update_with_half_a_fused_pair_is_refused():
    from r1mega.models.config import tiny_deepseek_v3

    policy = Transformer(tiny_deepseek_v3())
    stream = [(n, t) for n, t in hf_tensors(policy).items() if n != "model.layers.1.self_attn.kv_a_proj_with_mqa.weight"]
    with pytest.raises(ValueError, match="layers.1.self_attn.q_a_proj.weight arrived without"):
        list(flat_buckets(iter(stream), 1 << 20))
