"""The tokenizer: the default BPE built in code (round trips, single-id tags and digits, determinism,
cache), `from_dir` errors naming the file, and transformers' AutoTokenizer reading a saved directory."""

import hashlib
import json
import re
import subprocess
import sys

import pytest

from r1mega.data.templates import render_chatml, render_r1_zero
from r1mega.data.tokenizer import Tokenizer, build_default_tokenizer, cache_dir

TEXTS = [
    "A conversation between User and Assistant. 12 + 345 = 357",
    "<think> 7 * 8 = 56. Wait, let me verify. </think><answer> 56 </answer><|endoftext|>",
    "数学推理：二加二等于四。 Mixed 中文 and English, ünïcödé, emoji 🙂, tabs\tand\nnewlines  ",
    "",
]


@pytest.fixture(scope="module")
def default(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("R1MEGA_CACHE", str(cache))
        yield build_default_tokenizer(), cache


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(default, text):
    tok, _ = default
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text


def test_special_and_tag_tokens_are_single_ids(default):
    tok, _ = default
    for token in ["<|endoftext|>", "<think>", "</think>", "<answer>", "</answer>", "<|im_start|>", "<|im_end|>"]:
        assert tok.encode(token) == [tok.token_to_id(token)], token
    assert tok.eos_token_id == tok.pad_token_id == tok.token_to_id("<|endoftext|>")
    assert tok.bos_token_id is None
    ids = tok.encode("<think> x </think><answer> 1 </answer><|endoftext|>")
    # The tags survive skip_special_tokens (the format reward reads them); EOS does not.
    assert tok.decode(ids, skip_special_tokens=True) == "<think> x </think><answer> 1 </answer>"


def test_digits_are_single_tokens(default):
    tok, _ = default
    for text in ["1234567890", "x=9081726354;", " 00 42 "]:
        pieces = [tok.decode([i]) for i in tok.encode(text)]
        digits = [p for p in pieces if any(c.isdigit() for c in p)]
        assert digits == [c for c in text if c.isdigit()], pieces


def test_template_words_are_few_tokens(default):
    tok, _ = default
    prompt = render_r1_zero("Compute 12 + 7")
    assert len(tok.encode(prompt)) < len(prompt) / 4
    for word in [" conversation", " Assistant", " reasoning", " answer", " wait", " verify"]:
        assert len(tok.encode(word)) == 1, word


def test_cache_reused_and_build_deterministic_across_processes(default):
    tok, cache = default
    [built] = [d for d in cache.iterdir() if d.name.startswith("tokenizer-")]
    digest = hashlib.sha256((built / "tokenizer.json").read_bytes()).hexdigest()
    code = ("import hashlib; from r1mega.data.tokenizer import train_default_tokenizer as t; "
            "print(hashlib.sha256(t().backend.to_str().encode()).hexdigest())")
    env = {"PYTHONHASHSEED": "7", "PYTHONPATH": ":".join(sys.path)}
    fresh = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert hashlib.sha256(tok.backend.to_str().encode()).hexdigest() == fresh.stdout.strip()
    assert json.loads((built / "tokenizer.json").read_text()) == json.loads(tok.backend.to_str())
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("R1MEGA_CACHE", str(cache))
        assert cache_dir() == cache
        again = build_default_tokenizer()
    assert hashlib.sha256((built / "tokenizer.json").read_bytes()).hexdigest() == digest
    assert again.encode(TEXTS[0]) == tok.encode(TEXTS[0])


def test_saved_dir_loads_in_transformers(default, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok, _ = default
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
        assert hf.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id) == (tok.eos_token_id, tok.pad_token_id, None)
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        render_chatml(messages, add_generation_prompt=True)
    reloaded = Tokenizer.from_dir(tmp_path)
    assert reloaded.encode(TEXTS[1]) == tok.encode(TEXTS[1]) and reloaded.eos_token_id == tok.eos_token_id


def test_from_dir_errors_name_the_file(default, tmp_path):
    tok, _ = default
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Tokenizer.from_dir(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json not found"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path}/tokenizer.json is not a valid tokenizer.json")):
        Tokenizer.from_dir(tmp_path)
    tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json is not valid JSON"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: eos_token '</s>' is not in the vocabulary"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": {"content": "<|im_end|>"}}))
    found = Tokenizer.from_dir(tmp_path)  # no eos_token: the first known EOS name in the vocabulary
    assert found.eos_token == "<|endoftext|>" and found.pad_token_id == tok.token_to_id("<|im_end|>")
