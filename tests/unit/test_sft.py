"""SFT: the token pairs it builds (templates, ChatML, EOS, the leading space), its schedule (the default
unchanged), and a fine-tune that learns a response, saves a native checkpoint that reloads to the same
logits; rejection sampling through a real engine writes rows with provenance."""

import json
import math

import pytest
import torch

from r1mega.data.datasets import load_sft_dataset
from r1mega.data.templates import IM_END, get_template, render_chatml
from r1mega.data.tokenizer import build_default_tokenizer
from r1mega.models import ModelConfig, Transformer
from r1mega.models.checkpoint import load_native
from r1mega.pipeline.rejection import RejectionSettings, rejection_sample, write_jsonl
from r1mega.rewards import ScoringPool
from r1mega.rollout.engine import SamplingParams
from r1mega.rollout.native import NativeEngine
from r1mega.trainers.schedule import lr_factor
from r1mega.trainers.sft import fine_tune, sft_examples, train_sft


@pytest.fixture(scope="module")
def tokenizer():
    return build_default_tokenizer()


def tiny_model(vocab_size):
    torch.manual_seed(0)
    return Transformer(ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=vocab_size, hidden_size=32,
                                   intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, attention_bias=True, max_position_embeddings=512))


def test_sft_examples_render_templates_and_close_with_eos(tokenizer):
    r1 = get_template("r1_zero")
    rows = [{"prompt": "Compute 1 + 2", "response": "<think> 1 + 2 = 3. </think><answer> 3 </answer>"},
            {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    (p0, r0), (p1, r1_ids) = sft_examples(rows, tokenizer, r1)
    assert tokenizer.decode(p0) == r1("Compute 1 + 2")
    assert tokenizer.decode(r0[:-1]) == " " + rows[0]["response"]  # the space after "Assistant:"
    assert r0[-1] == r1_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(p1) == render_chatml(rows[1]["messages"][:1], add_generation_prompt=True)
    assert tokenizer.decode(r1_ids[:-1]) == "Hello" + IM_END  # the prompt ends in a newline: no space
    assert len(sft_examples(rows, tokenizer, r1, max_len=len(p1) + len(r1_ids))) == 1


def test_schedule_is_warmup_then_cosine_to_zero():
    steps, warmup = 40, 2
    for s in range(steps):
        ramp = (s + 1) / warmup
        cosine = 0.5 * (1 + math.cos(math.pi * (s - warmup) / (steps - warmup)))
        assert lr_factor(s, warmup_steps=warmup, total_steps=steps, kind="cosine") == pytest.approx(
            ramp if s < warmup else cosine)
        assert lr_factor(s, warmup_steps=warmup, total_steps=steps, kind="constant") == min(1.0, ramp)
    with pytest.raises(ValueError, match="schedule"):
        train_sft(tiny_model(16), [([1], [2])], steps=1, batch_size=1, lr=1e-3, schedule="linear")


GOOD = "<think> 4 + 4 = 8. </think><answer> 8 </answer>"


@pytest.fixture(scope="module")
def memorised(tokenizer, tmp_path_factory):
    """A tiny model fine-tuned on one response until it knows it by heart: (model, out_dir, summary)."""
    model, out = tiny_model(tokenizer.vocab_size), tmp_path_factory.mktemp("sft")
    summary = fine_tune(model, [{"prompt": "Compute 4 + 4", "response": GOOD}], tokenizer,
                        template=get_template("r1_zero"), out_dir=out, epochs=60, batch_size=1, lr=1e-2,
                        schedule="constant", warmup_steps=1)
    return model, out, summary


def test_fine_tune_learns_and_saves_a_native_checkpoint(tokenizer, memorised):
    model, tmp_path, summary = memorised
    response = GOOD
    assert summary["sft/steps"] == 60
    assert summary["sft/loss_last"] < 0.1 * summary["sft/loss_first"]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 60 and "sft/loss" in json.loads(lines[0])
    reloaded = load_native(tmp_path / "model")
    ids = torch.tensor([tokenizer.encode(get_template("r1_zero")("Compute 4 + 4"))])
    torch.testing.assert_close(reloaded(ids), model(ids))
    assert (tmp_path / "model" / "tokenizer.json").exists()
    # greedy decoding reproduces the memorised response
    engine = NativeEngine(reloaded, tokenizer, max_slots=2, max_len=256)
    sample = engine.generate([ids[0].tolist()], SamplingParams(temperature=0, max_new_tokens=40,
                                                               stop_token_ids=[tokenizer.eos_token_id]))[0][0]
    assert sample.text.strip() == response


def test_rejection_sample_keeps_correct_rows_with_provenance(tokenizer, memorised, tmp_path):
    model, good, template = memorised[0], GOOD, get_template("r1_zero")
    rows = [{"question": "Compute 4 + 4", "prompt": template("Compute 4 + 4"), "answer": "8"},
            {"question": "Compute 4 + 5", "prompt": template("Compute 4 + 5"), "answer": "1000"}]
    engine = NativeEngine(model, tokenizer, max_slots=8, max_len=256)
    settings = RejectionSettings(n=3, temperature=0.3, max_new_tokens=40, max_per_prompt=3)
    with ScoringPool({"math_accuracy": 1.0, "format_r1_zero": 1.0}) as scorer:
        kept, stats = rejection_sample(engine, tokenizer, rows, scorer, settings, source="ckpt/x")
    # the memorised, correct response is kept once (its copies are duplicates); the wrong prompt: nothing
    assert [r["response"] for r in kept] == [good]
    assert kept[0]["prompt_id"] == 0 and kept[0]["source_checkpoint"] == "ckpt/x"
    assert kept[0]["rewards"] == {"math_accuracy": 1.0, "format_r1_zero": 1.0}
    assert stats["rejection/samples"] == 6 and stats["rejection/kept"] == 1
    assert stats["rejection/dropped_duplicate"] + stats.get("rejection/dropped_incorrect", 0) == 5
    path = write_jsonl(kept, tmp_path / "data.jsonl")
    assert load_sft_dataset(path) == [{"prompt": "Compute 4 + 4", "response": good}]
