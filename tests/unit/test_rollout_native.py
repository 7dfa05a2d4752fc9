"""The native engine against independent references: transformers' greedy `generate` on the same tiny
random checkpoints (Qwen2 and DeepSeek-V3 MoE), a full no-cache forward for the returned logprobs,
a fresh engine for weights swapped in place, and brute-force stop-string cuts."""

import pytest
import torch

from r1mega.models import hf
from r1mega.models.checkpoint import iter_safetensors
from r1mega.rollout import Engine, SamplingParams
from r1mega.rollout.native import NativeEngine
from r1mega.rollout.weight_sync import WeightSyncError
from tiny_models import load_hf, make_hf_dir

PROMPTS = [[5, 17, 3], [40, 2, 9, 11, 60, 7, 1], [8] * 12, [90, 33]]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("rollout")
    return {v: make_hf_dir(v, root / v, seed=i + 10) for i, v in enumerate(["qwen2", "deepseek_v3"])}


def hf_greedy(model, prompt, new_tokens):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("variant", ["qwen2", "deepseek_v3"])
def test_greedy_matches_transformers_generate(checkpoints, variant):
    model, _ = hf.load(checkpoints[variant])
    # 3 slots for 4 prompts x 2 samples: slots are refilled, and a prompt's samples can be split across admissions
    engine = NativeEngine(model, max_slots=3, max_len=64)
    assert isinstance(engine, Engine)
    out = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_new_tokens=10, n=2))
    ref = load_hf(checkpoints[variant])
    for prompt, samples in zip(PROMPTS, out):
        want = hf_greedy(ref, prompt, 10)
        for s in samples:
            assert s.finish_reason == "length" and s.prompt_ids == prompt, s.error
            assert s.token_ids == want


def full_forward_logprobs(model, prompt, tokens, temperature):
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(ids)[0, len(prompt) - 1:-1] / temperature  # [len(tokens), V]
    return logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 20, 0.9)])
def test_logprobs_match_a_full_forward(checkpoints, temperature, top_k, top_p):
    model, _ = hf.load(checkpoints["deepseek_v3"])
    engine = NativeEngine(model, max_slots=4, max_len=64)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=8, n=2, seed=3)
    for prompt, samples in zip(PROMPTS, engine.generate(PROMPTS, params)):
        for s in samples:
            assert len(s.logprobs) == len(s.token_ids) == 8
            want = full_forward_logprobs(model, prompt, s.token_ids, temperature)
            torch.testing.assert_close(torch.tensor(s.logprobs), want, atol=1e-4, rtol=0)


def test_samples_finishing_at_different_steps_stay_exact(checkpoints):
    # Per-prompt lengths make samples finish at different steps, so finished slots are refilled and
    # running samples are moved between slots mid-generation (the engine keeps them packed).
    model, _ = hf.load(checkpoints["deepseek_v3"])
    engine = NativeEngine(model, max_slots=3, max_len=64)
    lengths = [3, 11, 6, 14]
    params = [SamplingParams(temperature=1.0, max_new_tokens=n, n=2, seed=5) for n in lengths]
    out = engine.generate(PROMPTS, params)
    alone = [NativeEngine(model, max_slots=1, max_len=64).generate([p], [q])[0] for p, q in zip(PROMPTS, params)]
    for prompt, n, samples, single in zip(PROMPTS, lengths, out, alone):
        assert [s.token_ids for s in samples] == [s.token_ids for s in single]
        for s in samples:
            assert len(s.token_ids) == n
            want = full_forward_logprobs(model, prompt, s.token_ids, 1.0)
            torch.testing.assert_close(torch.tensor(s.logprobs), want, atol=1e-4, rtol=0)


def test_seeded_sampling_is_reproducible_and_batch_independent(checkpoints):
    model, _ = hf.load(checkpoints["qwen2"])
    params = SamplingParams(temperature=1.0, max_new_tokens=8, n=3, seed=11)
    alone = NativeEngine(model, max_slots=3, max_len=64).generate([PROMPTS[1]], params)[0]
    crowded = NativeEngine(model, max_slots=5, max_len=64).generate(PROMPTS[::-1] + [PROMPTS[0]], params)[2]
    assert [s.token_ids for s in alone] == [s.token_ids for s in crowded]
    assert len({tuple(s.token_ids) for s in alone}) > 1  # the n samples differ from each other
    reseeded = NativeEngine(model, max_slots=3, max_len=64).generate(
        [PROMPTS[1]], SamplingParams(temperature=1.0, max_new_tokens=8, n=3, seed=12))[0]
    assert [s.token_ids for s in reseeded] != [s.token_ids for s in alone]


class PieceTokenizer:
    """Token i decodes to a piece of 1 to 3 letters, so stop strings can end inside a token."""

    def __init__(self, vocab):
        letters = "abcdefghijklmnopqrstuvwxyz"
        self.pieces = [letters[i % 26] * (1 + i % 3) for i in range(vocab)]

    def encode(self, text):
        raise NotImplementedError

    def decode(self, ids):
        return "".join(self.pieces[i] for i in ids)

    eos_token_id = 0


def test_stop_string_ends_the_text_and_truncates_tokens(checkpoints):
    model, config = hf.load(checkpoints["qwen2"])
    tok = PieceTokenizer(config.vocab_size)
    engine = NativeEngine(model, tok, max_slots=4, max_len=64)
    full = engine.generate([PROMPTS[1]], SamplingParams(temperature=0.0, max_new_tokens=20))[0][0]
    text = tok.decode(full.token_ids)
    # a stop string that starts inside the 5th token's text and ends inside the 7th's
    start = len(tok.decode(full.token_ids[:4])) + len(tok.pieces[full.token_ids[4]]) - 1
    end = len(tok.decode(full.token_ids[:6])) + 1
    stop = text[start:end]
    got = engine.generate([PROMPTS[1]], SamplingParams(temperature=0.0, max_new_tokens=20, stop=[stop, "zzzzzzzz"]))[0][0]
    cut = next(m for m in range(1, 21) if stop in tok.decode(full.token_ids[:m]))
    assert got.finish_reason == "stop"
    assert got.text == text[:text.index(stop) + len(stop)] and got.text.endswith(stop)
    assert got.token_ids == full.token_ids[:cut] and got.logprobs == pytest.approx(full.logprobs[:cut], abs=1e-6)
    # a stop token id: kept as the last token, left out of the text
    eos = full.token_ids[3]
    got = engine.generate([PROMPTS[1]], SamplingParams(temperature=0.0, max_new_tokens=20, stop_token_ids=[eos]))[0][0]
    first = full.token_ids.index(eos)
    assert got.finish_reason == "stop" and got.token_ids == full.token_ids[:first + 1]
    assert got.text == tok.decode(full.token_ids[:first])


def test_bad_requests_get_errors_and_the_others_complete(checkpoints):
    model, _ = hf.load(checkpoints["qwen2"])
    engine = NativeEngine(model, max_slots=2, max_len=32)
    good = SamplingParams(temperature=0.0, max_new_tokens=6, n=2)
    prompts = [PROMPTS[0], [], PROMPTS[1], PROMPTS[2], "text without a tokenizer", [3, 1000]]
    params = [good, good, SamplingParams(max_new_tokens=40), SamplingParams(stop=[7], max_new_tokens=6), good, good]
    out = engine.generate(prompts, params)
    errors = {i: out[i][0].error for i in range(1, 6)}
    assert all(s.finish_reason == "error" for i in errors for s in out[i])
    assert "empty" in errors[1] and "max_len" in errors[2] and "stop" in errors[3]
    assert "tokenizer" in errors[4] and "[0, 97)" in errors[5]
    ref = load_hf(checkpoints["qwen2"])
    assert [s.token_ids for s in out[0]] == [hf_greedy(ref, PROMPTS[0], 6)] * 2


def test_update_weights_in_place_equals_a_fresh_engine(checkpoints):
    model, config = hf.load(checkpoints["deepseek_v3"])
    engine = NativeEngine(model, max_slots=4, max_len=64)
    assert engine.model is not model  # a private copy by default
    pointers = {n: t.data_ptr() for n, t in engine.model.state_dict().items()}
    greedy = SamplingParams(temperature=0.0, max_new_tokens=8)
    before = [g[0].token_ids for g in engine.generate(PROMPTS, greedy)]
    new_dir = make_hf_dir("deepseek_v3", checkpoints["deepseek_v3"].parent / "new", seed=99)
    # HF hub names as transformers saved them, one tensor per expert, in small buckets
    engine.bucket_bytes = 4096
    engine.update_weights(iter_safetensors(new_dir), version=1)
    after = [g[0].token_ids for g in engine.generate(PROMPTS, greedy)]
    assert engine.version == 1
    assert {n: t.data_ptr() for n, t in engine.model.state_dict().items()} == pointers
    new_native, _ = hf.load(new_dir)
    fresh = [g[0].token_ids for g in NativeEngine(new_native, max_slots=4, max_len=64).generate(PROMPTS, greedy)]
    assert after == fresh and after != before
    # native names work too, and bring the old weights back
    engine.update_weights(model.state_dict().items(), version=2)
    assert [g[0].token_ids for g in engine.generate(PROMPTS, greedy)] == before


def test_update_weights_errors_name_the_tensor_and_leave_the_bucket_unapplied(checkpoints):
    model, _ = hf.load(checkpoints["qwen2"])
    engine = NativeEngine(model, max_slots=2, max_len=32)
    embed = engine.model.embed.weight.clone()
    with pytest.raises(WeightSyncError, match="layers.0.attn.wq.weight has shape"):
        engine.update_weights([("embed.weight", embed + 1), ("layers.0.attn.wq.weight", torch.zeros(3, 3))], version=5)
    with pytest.raises(WeightSyncError, match="unknown tensor layers.0.bogus"):
        engine.update_weights([("embed.weight", embed + 1), ("layers.0.bogus", torch.zeros(3))], version=5)
    assert engine.version == 0 and torch.equal(engine.model.embed.weight, embed)


def test_shared_weights_and_memory_release(checkpoints):
    model, _ = hf.load(checkpoints["qwen2"])
    engine = NativeEngine(model, max_slots=2, max_len=32, share_weights=True)
    assert engine.model is model
    greedy = SamplingParams(temperature=0.0, max_new_tokens=5)
    before = engine.generate(PROMPTS[:2], greedy)
    engine.release_memory()
    assert engine.cache is None
    with pytest.raises(RuntimeError, match="resume_memory"):
        engine.generate(PROMPTS[:2], greedy)
    engine.resume_memory()
    engine.update_weights(model.state_dict().items(), version=3)  # its own tensors: nothing to copy
    after = engine.generate(PROMPTS[:2], greedy)
    assert [g[0].token_ids for g in after] == [g[0].token_ids for g in before] and engine.version == 3


def test_kv_cache_sized_from_a_byte_budget(checkpoints):
    from r1mega.models.kv_cache import KVCache

    model, config = hf.load(checkpoints["qwen2"])
    per_slot = KVCache.bytes_per_token(config) * 32
    assert NativeEngine(model, max_slots=64, max_len=32, kv_cache_bytes=3 * per_slot + 1).num_slots == 3
    with pytest.raises(ValueError, match="holds no slot"):
        NativeEngine(model, max_len=32, kv_cache_bytes=per_slot - 1)
