"""The rollout engine is sized for every prompt that can reach it, and a prompt that cannot fit is
refused with its row named: at configuration time against the model's max_position_embeddings, at
request time by the engine, and never as an error sample scored 0 like a wrong answer. The reference is
the arithmetic: the longest prompt's token count (the tokenizer's own encode) + max_new_tokens."""

import pytest
import torch

from r1mega.config import Config
from r1mega.data.tokenizer import build_default_tokenizer
from r1mega.eval.run import EvalSettings, evaluate_rows
from r1mega.models import Transformer, preset
from r1mega.rollout.engine import SamplingParams, max_len_for
from r1mega.rollout.native import NativeEngine
from r1mega.trainers.components import longest_sequence

TOKENIZER = build_default_tokenizer()


def rows(*prompts):
    return [{"prompt": p, "question": p, "answer": "1"} for p in prompts]


def tiny_model(max_positions: int) -> Transformer:
    torch.manual_seed(0)
    return Transformer(preset("tiny_deepseek_v3", vocab_size=TOKENIZER.vocab_size,
                              max_position_embeddings=max_positions)).eval()


def config(max_new_tokens) -> Config:
    cfg = Config()
    cfg.rollout.max_new_tokens = max_new_tokens
    return cfg


def test_sized_for_every_training_and_held_out_prompt():
    # The longest training prompt lies past the first 2,048 rows; the longest of all is held out.
    train = rows(*["1+1"] * 2500, "12+34+56", *["2+2"] * 10)
    test = rows("3+3", "123+456+789+1")
    cfg = config([[0, 40], [5, 60]])
    max_len = longest_sequence(cfg, TOKENIZER, tiny_model(4096).config, {"training": train, "held-out": test})
    assert max_len == len(TOKENIZER.encode("123+456+789+1")) + 60
    assert max_len > len(TOKENIZER.encode("12+34+56")) + 60 > len(TOKENIZER.encode("1+1")) + 60


def test_a_prompt_past_max_position_embeddings_is_refused_naming_the_row_and_keys():
    test = rows("1+1", "123+456+789+1")
    positions = len(TOKENIZER.encode("123+456+789+1")) + 59
    with pytest.raises(ValueError, match=r"held-out row 1: .*rollout\.max_new_tokens \(60\).*max_position_embeddings"):
        longest_sequence(config([[0, 60]]), TOKENIZER, tiny_model(positions).config,
                         {"training": rows("1+1"), "held-out": test})
    assert max_len_for({"held-out": [TOKENIZER.encode(r["prompt"]) for r in test]}, 59, positions, key="k") == positions


def test_the_engine_refuses_a_request_past_max_position_embeddings():
    # The cache (max_len 64) would hold it; the model's 16 positions do not.
    engine = NativeEngine(tiny_model(16), TOKENIZER, max_slots=2, max_len=64)
    prompt = [5, 6, 7, 8]
    fits, past = engine.generate([prompt, prompt], [SamplingParams(temperature=0.0, max_new_tokens=12),
                                                    SamplingParams(temperature=0.0, max_new_tokens=13)])
    assert fits[0].finish_reason == "length" and len(fits[0].token_ids) == 12
    assert past[0].refused and "max_position_embeddings 16" in past[0].error


def test_evaluation_names_a_refused_row_instead_of_scoring_it_wrong():
    model = tiny_model(4096)
    data = rows("1+1", "123+456+789+123+456+789")
    engine = NativeEngine(model, TOKENIZER, max_slots=2, max_len=len(TOKENIZER.encode("1+1")) + 4)
    settings = EvalSettings(n=1, max_new_tokens=4, temperature=0.0)
    with pytest.raises(ValueError, match=r"refused row 1 \('123\+456"):
        evaluate_rows(engine, TOKENIZER, data, settings, scorer=None)
