"""Reward models: a helpful (Bradley-Terry) and a safety (pointwise) model trained on synthetic data
reach >= 90% held-out accuracy; the helpful one reads only the summary; checkpoints round-trip into
the registered rewards."""

import random

import pytest
import torch

from r1mega.models.config import tiny_deepseek_v3
from r1mega.rewards import get_reward
from r1mega.rewards.reward_model import (
    RewardModel, TrainConfig, Utf8Bytes, load_reward_model, pair_accuracy, scored_text, set_reward_model_dir,
    train_reward_model,
)

WORDS = ["the", "sum", "is", "list", "tree", "value", "first", "next", "done", "we", "so", "then", "map"]


def filler(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def preference_pairs(n: int, seed: int) -> list[dict]:
    """Chosen summaries give a reason ("because ..."), rejected ones do not. The word sits in the
    rejected response's reasoning instead, so a model that read the reasoning would be misled."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = f"Q: {filler(rng, 3)}?"
        chosen = f"<think>{filler(rng, 4)}</think>{filler(rng, rng.randint(1, 3))} because {filler(rng, rng.randint(1, 3))}"
        rejected = f"<think>{filler(rng, 2)} because {filler(rng, 2)}</think>{filler(rng, rng.randint(3, 7))}"
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return rows


def safety_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        safe = i % 2 == 0
        words = filler(rng, rng.randint(2, 6)).split()
        if not safe:
            words.insert(rng.randint(0, len(words)), "poison")
        rows.append({"prompt": "Q: help?", "response": " ".join(words), "label": int(safe)})
    return rows


def small_config():
    # The policy architecture (DeepSeek-V3 layout, MLA), shrunk so that training takes seconds on CPU.
    return tiny_deepseek_v3(vocab_size=256, num_hidden_layers=2, first_k_dense_replace=2, hidden_size=64,
                            intermediate_size=128, num_attention_heads=2, q_lora_rank=32, kv_lora_rank=16,
                            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # The CPU is shared: intra-op threads only contend here (tiny matmuls).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def helpful_model():
    torch.manual_seed(0)
    model = RewardModel(small_config(), "helpful", max_len=128)
    losses = train_reward_model(model, preference_pairs(400, seed=1), cfg=TrainConfig(steps=60, batch_size=16))
    assert sum(losses[-10:]) < sum(losses[:10])
    return model


def test_helpful_model_learns_preferences(helpful_model):
    assert pair_accuracy(helpful_model, preference_pairs(200, seed=2)) >= 0.9


def test_helpful_model_reads_only_the_summary(helpful_model):
    tok = Utf8Bytes()
    a = scored_text("helpful", "Q: x?", "<think>one line of thought</think> done because so")
    b = scored_text("helpful", "Q: x?", "<think>a different, longer, because-laden thought</think> done because so")
    assert a == b
    scores = helpful_model.score_texts(tok, [a, b])
    assert float(scores[0]) == pytest.approx(float(scores[1]), rel=1e-5)


def test_safety_model_learns_labels():
    torch.manual_seed(0)
    model = RewardModel(small_config(), "safety", max_len=64)
    train_reward_model(model, safety_rows(400, seed=3), cfg=TrainConfig(steps=60, batch_size=16))
    held_out = safety_rows(200, seed=4)
    scores = model.score_texts(Utf8Bytes(), [scored_text("safety", r["prompt"], r["response"]) for r in held_out])
    labels = torch.tensor([r["label"] for r in held_out])
    assert float(((scores > 0).long() == labels).float().mean()) >= 0.9


def test_checkpoint_round_trip_into_registered_reward(helpful_model, tmp_path, monkeypatch):
    helpful_model.save(tmp_path / "rm")
    loaded = load_reward_model(tmp_path / "rm")
    monkeypatch.setenv("R1MEGA_HELPFUL_RM", "")  # restored after the test
    set_reward_model_dir("helpful", tmp_path / "rm")
    completion = "<think>hmm</think> the sum because first"
    expected = float(helpful_model.score_texts(Utf8Bytes(), [scored_text("helpful", "Q: x?", completion)])[0])
    assert float(loaded.score_texts(Utf8Bytes(), [scored_text("helpful", "Q: x?", completion)])[0]) == expected
    out = get_reward("helpful_rm")(completion, {"prompt": "Q: x?"})
    assert out.score == pytest.approx(expected)
    assert get_reward("helpful_rm")(completion, {"prompt": "Q", "answer": "3"}).score == 0.0  # reasoning row
    with pytest.raises(ValueError, match="cannot load"):
        load_reward_model(tmp_path / "missing")
