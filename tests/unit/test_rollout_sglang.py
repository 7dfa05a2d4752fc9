"""The SGLang engine without SGLang: request building, response parsing, weight buckets and names, and
the HTTP mode end to end against a fake SGLang server on 127.0.0.1.

The fake server implements SGLang's native endpoints as SGLang 0.5.23's source reads (engine.py,
http_server.py, schedule_batch.py's finish checks: length before stop tokens, `ignore_eos` also
disabling `stop_token_ids`; the tokenizer manager's context check, prompt >= context or prompt +
max_new_tokens > context refused; SamplingParams' normalisation and `verify`, as tests/sglang_rules.py
writes them; logprobs of the temperature-scaled logits, temperature 1 when greedy; the scheduler's
SafeUnpickler allow-list; flush_cache and release_memory_occupation only on an idle scheduler, a flush
with a timeout waiting for it). What runs against SGLang's own code is test_rollout_sglang_real.py; a real
engine is the GPU test at the end (skipped here) and benchmarks/sglang_engine.py.
"""

from __future__ import annotations

import base64
import datetime
import io
import json
import math
import pickle
import socket
import threading
import types
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from multiprocessing.reduction import ForkingPickler

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from r1mega.models import hf
from r1mega.rollout.engine import Engine, SamplingParams, validate
from r1mega.rollout.sampling import sample_generator
from r1mega.rollout.sglang import SGLangEngine
from r1mega.rollout.sglang_http import HTTPBackend
from r1mega.rollout.sglang_protocol import (FlatMeta, SGLangError, bucket_payloads, expand, flat_buckets, flatten,
                                            parse_output, sglang_sampling, to_hf, unflatten)
from sglang_rules import sglang_sampling_rules
from tiny_models import make_hf_dir

CHARS = "abcdefghijklmnopqrstuvwxyz .!"  # a character tokenizer; "!" is the EOS
EOS = CHARS.index("!")
CONTEXT = 12  # the fake server's context length: longer prompts fail the whole batch, as SGLang does


class CharTokenizer:
    eos_token_id = EOS

    def encode(self, text):
        return [CHARS.index(c) for c in text]

    def decode(self, ids):
        return "".join(CHARS[i] for i in ids)


TOK = CharTokenizer()


def serialize(obj) -> str:
    """SGLang's MultiprocessingSerializer.serialize(obj, output_str=True): ForkingPickler + base64."""
    buf = io.BytesIO()
    ForkingPickler(buf).dump(obj)
    return base64.b64encode(buf.getvalue()).decode()


class AllowListUnpickler(pickle.Unpickler):
    """SGLang's SafeUnpickler's rule: builtins, torch's rebuild functions and data types, a few sglang
    containers and types.SimpleNamespace; any other class (a test's own dataclass) is refused."""

    def find_class(self, module, name):
        if module.split(".")[0] in ("builtins", "torch", "copyreg", "sglang") or (module, name) == (
                "types", "SimpleNamespace") or module.startswith("multiprocessing."):
            return super().find_class(module, name)
        raise RuntimeError(f"Blocked unsafe global ({module}.{name}) during pickle deserialization")


def deserialize(text: str):
    return AllowListUnpickler(io.BytesIO(base64.b64decode(text))).load()


PEAK = 2.0  # the fake model's logit for its next token (every other token's is 0)


# ---- the fake SGLang server
def fake_logits(last_token: int) -> torch.Tensor:
    """The fake model: after token t, logit PEAK on (t + 1) mod V and 0 elsewhere."""
    logits = torch.zeros(len(CHARS), dtype=torch.float64)
    logits[(last_token + 1) % len(CHARS)] = PEAK
    return logits


def fake_generate(input_ids, sp, temperature, abort):
    """Token k of a generation is (last prompt token + k + 1) mod V, the fake model's mode, whatever the
    temperature; its logprob is SGLang's: log softmax(logits / temperature) (temperature 1 when greedy
    or when the server sets SGLANG_RETURN_ORIGINAL_LOGPROB)."""
    out, lps, finish = [], [], None
    while finish is None:
        logits = fake_logits((input_ids + out)[-1])
        token = int(logits.argmax())
        out.append(token)
        lps.append([float(torch.log_softmax(logits / temperature, -1)[token]), token, None])
        if abort:
            finish = {"type": "abort", "message": "Abort requested"}
        elif len(out) >= sp["max_new_tokens"]:
            finish = {"type": "length", "length": sp["max_new_tokens"]}
        elif not sp["ignore_eos"] and (token in sp["stop_token_ids"] or token == EOS):
            finish = {"type": "stop", "matched": token}
        elif any(s in TOK.decode(out) for s in sp["stop"]):
            finish = {"type": "stop", "matched": next(s for s in sp["stop"] if s in TOK.decode(out))}
    return {"text": TOK.decode(out), "output_ids": out,
            "meta_info": {"finish_reason": finish, "output_token_logprobs": lps, "completion_tokens": len(out)}}


def fake_logprob(last_token: int, temperature: float) -> float:
    """What the fake server reports for the token after `last_token`, in closed form."""
    scaled = PEAK / temperature
    return scaled - math.log(len(CHARS) - 1 + math.exp(scaled))


class FakeSGLang(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):
        state = self.server.state
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        path, query = self.path.partition("?")[::2]
        wait = float(urllib.parse.parse_qs(query).get("timeout", ["0"])[0])
        state["calls"].append((path, body.get("tags") or body.get("names")))
        if path == "/generate":
            assert body["return_logprob"] is True
            try:  # the tokenizer manager refuses the whole batch for one bad request
                rules = [sglang_sampling_rules(sp) for sp in body["sampling_params"]]
            except ValueError as e:
                return self.reply(400, {"error": {"message": str(e)}})
            if any(len(ids) >= CONTEXT or len(ids) + sp["max_new_tokens"] > CONTEXT
                   for ids, sp in zip(body["input_ids"], body["sampling_params"])):
                return self.reply(400, {"error": {"message": f"input is longer than the context ({CONTEXT})"}})
            state["generated"] += [(ids, sp) for ids, sp in zip(body["input_ids"], body["sampling_params"])]
            return self.reply(200, [fake_generate(ids, sp, 1.0 if state["original_logprob"] else r["temperature"],
                                                  state["abort"])
                                    for ids, sp, r in zip(body["input_ids"], body["sampling_params"], rules)])
        if path == "/update_weights_from_tensor":
            assert body["load_format"] == "flattened_bucket" and body["flush_cache"] is False
            assert len(body["serialized_named_tensors"]) == state["tp_size"]
            for payload in body["serialized_named_tensors"]:  # every TP rank reads its own copy
                bucket = deserialize(payload)
                for name, t in unflatten(bucket["flattened_tensor"], bucket["metadata"]):
                    state["weights"][name] = t.clone()
            state["bucket_names"].append(sorted(m.name for m in bucket["metadata"]))
            return self.reply(200, {"success": True, "message": "ok"})
        if path == "/init_weights_update_group":
            store = dist.TCPStore(body["master_address"], body["master_port"], body["world_size"], False,
                                  timeout=datetime.timedelta(seconds=20))
            state["group"] = dist.ProcessGroupGloo(store, body["rank_offset"], body["world_size"],
                                                   datetime.timedelta(seconds=20))
            return self.reply(200, {"success": True, "message": "ok"})
        if path == "/update_weights_from_distributed":
            for name, dtype, shape in zip(body["names"], body["dtypes"], body["shapes"]):
                t = torch.empty(shape, dtype=getattr(torch, dtype))
                state["group"].broadcast(t, 0).wait()  # in the order of the names, as SGLang receives
                state["weights"][name] = t
            return self.reply(200, {"success": True, "message": "ok"})
        if path == "/flush_cache":
            if state["draining"] and wait > 0:  # a flush with a timeout waits for the requests to finish
                state["draining"] = 0
            if state["draining"]:
                return self.reply(400, "Cache not flushed because there are pending requests.")
            return self.reply(200, None)
        if path == "/release_memory_occupation" and state["draining"]:
            return self.reply(500, {"error": {"message": "release_memory_occupation should be called only when "
                                                         "server is idle."}})
        if path in ("/release_memory_occupation", "/resume_memory_occupation", "/abort_request"):
            return self.reply(200, None)
        self.reply(404, {"error": {"message": f"no route {path}"}})


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeSGLang)
    httpd.state = {"calls": [], "generated": [], "weights": {}, "abort": False, "tp_size": 2, "draining": 0,
                   "bucket_names": [], "original_logprob": False}
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def http_engine(server, **kw) -> SGLangEngine:
    url = f"http://127.0.0.1:{server.server_address[1]}"
    return SGLangEngine(HTTPBackend(url, timeout_s=30, control_timeout_s=30), tokenizer=TOK, tp_size=2,
                        serializer=(serialize, types.SimpleNamespace), device="cpu", timeout_s=30, **kw)


# ---- requests
def test_sampling_params_map_to_sglang_names_and_conventions():
    p = SamplingParams(temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=5, stop_token_ids=[EOS], stop=["ab"], n=3)
    assert sglang_sampling(p) == {"temperature": 0.7, "top_p": 0.9, "top_k": -1, "max_new_tokens": 5,
                                  "stop_token_ids": [EOS], "stop": ["ab"], "ignore_eos": False,
                                  "no_stop_trim": True, "skip_special_tokens": False, "n": 1}
    # no stop ids: SGLang must not stop at the model's EOS (the native engine does not)
    bare = sglang_sampling(SamplingParams(top_k=4), seed=11)
    assert bare["ignore_eos"] is True and bare["top_k"] == 4 and bare["sampling_seed"] == 11


def test_expand_makes_one_request_per_sample_seeded_like_the_native_engine():
    prompt, p = [3, 1, 4], SamplingParams(n=3, seed=1234)
    pending = expand(5, prompt, p, send_seed=True, default_seed=lambda: 0)
    assert [(x.prompt_index, x.index) for x in pending] == [(5, 0), (5, 1), (5, 2)]
    native = [sample_generator(1234, prompt, j, "cpu").initial_seed() for j in range(3)]
    assert [x.request["sampling_params"]["sampling_seed"] for x in pending] == native
    assert all(x.request["input_ids"] == prompt for x in pending)
    unseeded = expand(0, prompt, p, send_seed=False, default_seed=lambda: 0)
    assert all("sampling_seed" not in x.request["sampling_params"] for x in unseeded)


@pytest.mark.parametrize("prompt, params, match", [
    ([], SamplingParams(), "empty prompt"),
    ([1, 40], SamplingParams(), "token ids"),
    ([1], SamplingParams(n=0), "n must"),
    ([1], SamplingParams(max_new_tokens=0), "max_new_tokens"),
    ([1] * 998, SamplingParams(max_new_tokens=3), "max_len"),
    ([1], SamplingParams(temperature=-1.0), "temperature"),
    ([1], SamplingParams(top_p=0.0), "top_p"),
    ([1], SamplingParams(top_k=-2), "top_k"),
    ([1], SamplingParams(stop=[""]), "stop strings"),
])
def test_validate_refuses_what_the_native_engine_refuses(prompt, params, match):
    with pytest.raises(ValueError, match=match):
        validate(prompt, params, vocab_size=len(CHARS), max_len=1000)


# ---- responses
def out(tokens, finish, text=None):
    return {"text": text if text is not None else TOK.decode(tokens),
            "meta_info": {"finish_reason": finish, "output_token_logprobs": [[-0.5 * (i + 1), t, None]
                                                                             for i, t in enumerate(tokens)]}}


def test_parse_output_follows_native_conventions():
    p = SamplingParams(max_new_tokens=3, stop_token_ids=[EOS], stop=["cd"])
    # a stop token drawn as the last allowed token: SGLang says length, the native engine says stop
    s = parse_output(out([0, 1, EOS], {"type": "length", "length": 3}), [7], p, TOK)
    assert (s.finish_reason, s.token_ids, s.logprobs, s.text) == ("stop", [0, 1, EOS], [-0.5, -1.0, -1.5], "ab")
    # a stop string completed inside a token's text: the text ends right after it
    two_char = parse_output(out([1, 2, 3, 4], {"type": "stop", "matched": "cd"}, text="bcde"), [7], p, TOK)
    assert two_char.text == "bcd" and two_char.finish_reason == "stop"
    s = parse_output(out([0, 1, 2], {"type": "length", "length": 3}), [7], p, TOK)
    assert (s.finish_reason, s.text) == ("length", "abc")
    # without a tokenizer, SGLang's text cut after the stop string
    assert parse_output(out([1, 2, 3, 4], {"type": "stop", "matched": "cd"}), [7], p).text == "bcd"
    aborted = parse_output(out([0], {"type": "abort", "message": "Abort requested"}), [7], p, TOK)
    assert aborted.finish_reason == "error" and "Abort requested" in aborted.error
    missing = parse_output({"text": "a", "meta_info": {"finish_reason": {"type": "length"}}}, [7], p, TOK)
    assert missing.finish_reason == "error" and "logprobs" in missing.error


# ---- weights
def test_flat_buckets_round_trip_by_dtype_and_size():
    g = torch.Generator().manual_seed(0)
    named = [("a", torch.randn(3, 5, generator=g)), ("b", torch.randn(7, generator=g).bfloat16()),
             ("c", torch.randn(2, 2, 2, generator=g)), ("d", torch.randn(40, generator=g)),
             ("e", torch.randint(0, 9, (4,), generator=g))]
    got, max_elements = [], 0
    for bucket in flat_buckets(iter(named), bucket_bytes=128):
        flat, metas = flatten(bucket)
        assert flat.dim() == 1 and {m.dtype for m in metas} == {flat.dtype}
        max_elements = max(max_elements, sum(t.numel() * t.element_size() for _, t in bucket))
        got += unflatten(flat.clone(), metas)
    assert sorted(n for n, _ in got) == [n for n, _ in named]
    for name, t in got:
        ref = dict(named)[name]
        assert t.dtype == ref.dtype and torch.equal(t, ref)
    assert max_elements <= 160  # "d" alone is 160 bytes: a bucket over the limit only holds one tensor
    with pytest.raises(ValueError, match="one dtype"):
        flatten(named[:2])


def test_bucket_payloads_serialise_once_per_rank_and_deserialise_to_the_same_tensors():
    named = [("x", torch.arange(6.0).view(2, 3)), ("y", torch.ones(4))]
    flat, metas = flatten(named)
    payloads = bucket_payloads(flat, metas, 3, serialize)
    assert len(payloads) == 3 and all(isinstance(p, str) for p in payloads)
    with pytest.raises(RuntimeError, match="Blocked"):  # SGLang's unpickler refuses a class of ours
        deserialize(bucket_payloads(flat, metas, 1, serialize, FlatMeta)[0])
    for payload in payloads:
        bucket = deserialize(payload)
        assert set(bucket) == {"flattened_tensor", "metadata"}
        back = dict(unflatten(bucket["flattened_tensor"], bucket["metadata"]))
        assert torch.equal(back["x"], named[0][1]) and torch.equal(back["y"], named[1][1])


@pytest.mark.parametrize("variant", ["deepseek_v3", "qwen2"])
def test_to_hf_gives_the_hub_layout_transformers_writes(tmp_path, variant):
    path = make_hf_dir(variant, tmp_path)  # transformers' save_pretrained: per-expert, tied head left out
    reference = load_file(str(path / "model.safetensors"))
    model, config = hf.load(path)
    got = dict(to_hf(config, model.state_dict().items()))
    assert set(got) == set(reference)
    assert all(torch.equal(got[n], reference[n]) for n in reference)
    # an HF stream passes through (a tied head dropped: SGLang ties it)
    extra = [("lm_head.weight", torch.zeros(1))] if config.tie_word_embeddings else []
    assert [n for n, _ in to_hf(config, extra + list(reference.items()))] == list(reference)


# ---- the HTTP mode against the fake server
def test_http_generate_serves_every_sample_and_isolates_bad_requests(server):
    engine = http_engine(server)
    assert isinstance(engine, Engine)
    params = SamplingParams(n=2, max_new_tokens=4, stop_token_ids=[EOS], stop=["q"])
    prompts = [[0, 1], "n", [2] * (CONTEXT + 1), []]
    groups = engine.generate(prompts, params)
    assert [len(g) for g in groups] == [2, 2, 2, 1 * 2]
    first = groups[0][0]  # after token 1: 2, 3, 4, 5
    assert (first.token_ids, first.text, first.finish_reason) == ([2, 3, 4, 5], "cdef", "length")
    assert first.logprobs == pytest.approx([fake_logprob(t, 1.0) for t in [1, 2, 3, 4]], rel=1e-12)
    assert groups[1][1].text == "opq" and groups[1][1].finish_reason == "stop"  # "n" -> o, p, q: stop string
    assert all(s.finish_reason == "error" and "context" in s.error for s in groups[2])  # refused by the server
    assert all(s.finish_reason == "error" and "empty" in s.error for s in groups[3])  # never sent
    assert len(server.state["generated"]) == 4  # the two good prompts, 2 samples each, sent once more alone
    assert all(sp["n"] == 1 and sp["max_new_tokens"] == 4 for _, sp in server.state["generated"])


def test_http_generate_stops_at_the_last_allowed_stop_token_like_native(server):
    engine = http_engine(server)
    [[s]] = engine.generate([[CHARS.index("y")]], SamplingParams(max_new_tokens=4, stop_token_ids=[EOS]))
    assert s.token_ids == [25, 26, 27, 28] and s.finish_reason == "stop" and s.text == "z ."  # EOS dropped


@pytest.mark.parametrize("temperature, scaled_by", [(0.5, 0.5), (1.0, 1.0), (1.7, 1.7), (0.0, 1.0)])
def test_http_logprobs_keep_sglangs_meaning_the_native_one(server, temperature, scaled_by):
    engine = http_engine(server)
    [[s]] = engine.generate([[1]], SamplingParams(temperature=temperature, max_new_tokens=3))
    assert s.token_ids == [2, 3, 4]
    assert s.logprobs == pytest.approx([fake_logprob(t, scaled_by) for t in [1, 2, 3]], rel=1e-12)


def test_temperatures_sglang_would_decode_greedily_are_refused_before_sending(server):
    engine = http_engine(server)
    [[tiny], [zero]] = engine.generate([[1], [1]], [SamplingParams(temperature=1e-7, max_new_tokens=2),
                                                    SamplingParams(temperature=0.0, max_new_tokens=2)])
    assert tiny.finish_reason == "error" and "use 0 for greedy" in tiny.error
    assert zero.token_ids == [2, 3] and len(server.state["generated"]) == 1


def test_an_in_process_engine_refuses_sglangs_raw_logprob_switch(monkeypatch):
    from r1mega.models import Transformer
    from r1mega.models.config import tiny_qwen2

    monkeypatch.setenv("SGLANG_RETURN_ORIGINAL_LOGPROB", "True")
    with pytest.raises(ValueError, match="SGLANG_RETURN_ORIGINAL_LOGPROB is set"):
        SGLangEngine.from_policy(Transformer(tiny_qwen2(vocab_size=len(CHARS))), TOK)


def test_http_abort_turns_running_samples_into_errors(server):
    engine = http_engine(server)
    server.state["abort"] = True
    engine.abort()
    [[s]] = engine.generate([[1]], SamplingParams(max_new_tokens=5))
    assert s.finish_reason == "error" and "aborted" in s.error
    assert ("/abort_request", None) in server.state["calls"]


def test_release_and_flush_wait_for_requests_still_draining_after_an_abort(server):
    engine = http_engine(server)
    server.state["draining"] = 1  # aborted requests not finished yet: SGLang refuses an immediate flush/release
    engine.release_memory()
    assert [p for p, _ in server.state["calls"]] == ["/flush_cache", "/release_memory_occupation"]
    server.state["draining"] = 1
    engine.update_weights([("model.norm.weight", torch.ones(8))], version=1)
    assert engine.version == 1


def test_weight_update_keeps_deepseeks_fused_pair_in_one_request(server):
    engine = http_engine(server, bucket_bytes=1)  # every other tensor alone
    named = [("model.layers.0.self_attn.q_a_proj.weight", torch.randn(4, 2)), ("model.norm.weight", torch.randn(2)),
             ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", torch.randn(3, 2))]
    engine.update_weights(iter(named), version=1)
    requests = [names for p, names in server.state["calls"] if p == "/update_weights_from_tensor"]
    assert len(requests) == 2 and all(torch.equal(server.state["weights"][n], t) for n, t in named)
    assert sorted(server.state["bucket_names"]) == [["model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
                                                     "model.layers.0.self_attn.q_a_proj.weight"],
                                                    ["model.norm.weight"]]


def test_http_weight_update_sends_hf_buckets_then_flushes_once(server):
    engine = http_engine(server, dtype=torch.bfloat16, bucket_bytes=64)
    named = [("model.embed_tokens.weight", torch.randn(4, 8)),
             ("model.layers.0.mlp.gate.e_score_correction_bias", torch.randn(4)),
             ("model.norm.weight", torch.randn(8))]
    engine.update_weights(iter(named), version=7)
    assert engine.version == 7
    for name, t in named:
        got = server.state["weights"][name]
        expected = t if name.endswith("correction_bias") else t.bfloat16()  # the router bias stays fp32
        assert got.dtype == expected.dtype and torch.equal(got, expected)
    paths = [p for p, _ in server.state["calls"]]
    assert paths.count("/update_weights_from_tensor") >= 2 and paths[-1] == "/flush_cache"
    assert paths.count("/flush_cache") == 1


def test_memory_release_and_resume_order(server):
    engine = http_engine(server)
    calls = server.state["calls"]
    engine.release_memory()  # once idle (a flush that waits for it)
    assert calls == [("/flush_cache", None), ("/release_memory_occupation", ["weights", "kv_cache", "cuda_graph"])]
    with pytest.raises(RuntimeError, match="resume_memory"):
        engine.generate([[1]], SamplingParams(max_new_tokens=1))
    engine.update_weights([("model.norm.weight", torch.ones(8))], version=1)
    # the weights come back alone, are written, then the cache is flushed; the KV cache stays released
    assert [p for p, _ in calls[2:]] == ["/resume_memory_occupation", "/update_weights_from_tensor", "/flush_cache"]
    assert calls[2][1] == ["weights"]
    engine.resume_memory()
    assert calls[-1] == ("/resume_memory_occupation", ["kv_cache", "cuda_graph"])
    assert engine.generate([[1]], SamplingParams(max_new_tokens=1))[0][0].finish_reason == "length"
    # resumed without a weight update in between: the released weights are gone, generate refuses
    engine.release_memory()
    engine.resume_memory()
    assert calls[-2:] == [("/resume_memory_occupation", ["weights"]),
                          ("/resume_memory_occupation", ["kv_cache", "cuda_graph"])]
    with pytest.raises(RuntimeError, match="update_weights"):
        engine.generate([[1]], SamplingParams(max_new_tokens=1))


def test_http_weight_update_through_a_broadcast_group(server):
    def gloo_group(address, port, world_size, name, backend):
        store = dist.TCPStore(address, port, world_size, True, timeout=datetime.timedelta(seconds=20))
        return dist.ProcessGroupGloo(store, 0, world_size, datetime.timedelta(seconds=20))

    engine = http_engine(server, group_factory=gloo_group, bucket_bytes=64)
    engine.init_weights_update_group("127.0.0.1", free_port(), 2, backend="gloo")
    named = [("model.embed_tokens.weight", torch.randn(3, 4)), ("model.norm.weight", torch.randn(4)),
             ("lm_head.weight", torch.randn(3, 4))]
    engine.update_weights(named, version=2)
    assert engine.version == 2
    assert all(torch.equal(server.state["weights"][n], t) for n, t in named)
    assert [p for p, _ in server.state["calls"]].count("/update_weights_from_distributed") == 2  # 2 buckets


def free_port() -> int:
    """A free loopback port for the group's rendezvous store."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_http_errors_name_the_call():
    engine = SGLangEngine(HTTPBackend("http://127.0.0.1:9", control_timeout_s=2), tokenizer=TOK)
    with pytest.raises(SGLangError, match="unreachable"):
        engine.release_memory()


# ---- with SGLang and a GPU
@pytest.mark.gpu
def test_sglang_engine_logprobs_match_the_trainer(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("sglang", reason="needs SGLang (pip install r1mega[sglang])")
    from r1mega.models import Transformer
    from r1mega.models.config import tiny_deepseek_v3
    from r1mega.data.tokenizer import build_default_tokenizer
    from r1mega.config import SGLangConfig

    tokenizer = build_default_tokenizer()
    torch.manual_seed(0)
    policy = Transformer(tiny_deepseek_v3(vocab_size=tokenizer.vocab_size)).cuda()
    engine = SGLangEngine.from_policy(policy, tokenizer, options=SGLangConfig(dtype="float32", mem_fraction_static=0.3))
    try:
        prompt = tokenizer.encode("What is 2 + 3?")
        [[s]] = engine.generate([prompt], SamplingParams(temperature=0.8, max_new_tokens=16))
        ids = torch.tensor([prompt + s.token_ids], device="cuda")
        with torch.no_grad():
            logits = policy(ids)[0, len(prompt) - 1:-1].float() / 0.8
        ref = logits.log_softmax(-1).gather(-1, ids[0, len(prompt):, None])[:, 0]
        assert torch.allclose(torch.tensor(s.logprobs, device="cuda"), ref, atol=2e-2)
    finally:
        engine.shutdown()


class _LoopEngine:
    """The shape of `sglang.Engine` that abort_all relies on: `generate` drives an asyncio loop in the
    caller's thread until the request ends, and `tokenizer_manager.abort_request` must run on that loop."""

    def __init__(self):
        import asyncio

        self.loop = asyncio.new_event_loop()
        self.started = threading.Event()
        self.aborts: list[tuple[int, bool]] = []  # (generate call it hit, called from the loop's thread)
        self.calls = 0
        self.tokenizer_manager = types.SimpleNamespace(abort_request=self._abort_request)
        self._finished = None

    def _abort_request(self, abort_all: bool) -> None:
        self.aborts.append((self.calls, threading.current_thread() is threading.main_thread()))
        self._finished.set_result("aborted")

    def generate(self, input_ids, sampling_params, return_logprob):
        self.calls += 1
        self._finished = self.loop.create_future()
        self.loop.call_soon(self.started.set)
        result = self.loop.run_until_complete(self._finished)  # runs until an abort ends the request
        self.started.clear()
        return [{"result": result}]


@pytest.mark.timeout(20)  # an abort that never reaches the loop leaves generate waiting
def test_in_process_abort_from_another_thread_runs_on_the_engine_loop_and_only_for_its_call():
    from r1mega.rollout.sglang_engine import InProcessBackend

    engine = _LoopEngine()
    backend = InProcessBackend(engine)
    backend.abort_all()  # nothing runs: no-op, and nothing queued for the next call

    def abort_when_running():
        engine.started.wait()
        backend.abort_all()

    thread = threading.Thread(target=abort_when_running)
    thread.start()
    assert backend.generate([{"input_ids": [1], "sampling_params": {}}]) == [{"result": "aborted"}]
    thread.join()
    assert engine.aborts == [(1, True)]  # the first call, aborted on the loop's (the caller's) thread

    stale = threading.Thread(target=backend.abort_all)  # idle again: a late abort must not reach call 2
    stale.start()
    stale.join()
    thread = threading.Thread(target=abort_when_running)
    thread.start()
    backend.generate([{"input_ids": [2], "sampling_params": {}}])
    thread.join()
    assert engine.aborts == [(1, True), (2, True)]
