"""What a step's rollouts say (reward, accuracy, length, reflective words, logprob mismatch), and
held-out accuracy through the same engine and scorer."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from r1mega.rollout.engine import raise_refused
from r1mega.trainers.metrics import reflective_word_count


def accuracy_of(components: Mapping[str, Sequence[float]]) -> list[float] | None:
    """Per-sample correctness: the reward components whose name says they grade the answer."""
    graded = [list(values) for name, values in components.items() if name.endswith("accuracy")]
    if not graded:
        return None
    return [float(all(v[i] >= 1.0 for v in graded)) for i in range(len(graded[0]))]


def rollout_metrics(samples, scores, batch, tokenizer) -> dict[str, float]:
    lengths = torch.tensor([len(s.token_ids) for s in samples], dtype=torch.float32)
    rewards = torch.as_tensor(scores.rewards, dtype=torch.float32)
    metrics = {
        "reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()) if len(rewards) > 1 else 0.0,
        "response_length/mean": float(lengths.mean()), "response_length/max": float(lengths.max()),
        "response_length/truncated": sum(s.finish_reason == "length" for s in samples) / len(samples),
        "reflective_words/mean": sum(reflective_word_count(s.text) for s in samples) / len(samples),
    }
    accuracy = accuracy_of(scores.components)
    if accuracy is not None:
        metrics["accuracy"] = sum(accuracy) / len(accuracy)
    if batch.old_logp is not None:
        # The engine's logprobs against the trainer's for the same tokens: weight-sync or numerics drift.
        diff = (batch.engine_logp - batch.old_logp).abs() * batch.mask
        metrics["rollout/logprob_mismatch"] = float(diff.sum() / batch.mask.sum().clamp(min=1))
        metrics["rollout/logprob_mismatch_max"] = float(diff.max())
    return metrics


def generate_and_score(engine, tokenizer, rows: Sequence[Mapping[str, Any]], scorer, sampling):
    """(`sampling.n` samples per question, flat, question after question; their scores)."""
    groups = engine.generate([tokenizer.encode(r["prompt"]) for r in rows], sampling)
    raise_refused(groups, rows)
    samples = [s for group in groups for s in group]
    return samples, scorer.score([s.text for s in samples], [r for r in rows for _ in range(sampling.n)])


def eval_metrics(samples, scores) -> dict[str, float]:
    """Held-out accuracy, reward and response length of `generate_and_score`'s samples (gathered from
    every data-parallel rank when they were generated in shares)."""
    accuracy = accuracy_of(scores.components) or [0.0] * len(samples)
    return {
        "eval/accuracy": sum(accuracy) / len(accuracy),
        "eval/reward": float(torch.as_tensor(scores.rewards, dtype=torch.float32).mean()),
        "eval/response_length": sum(len(s.token_ids) for s in samples) / len(samples),
    }
