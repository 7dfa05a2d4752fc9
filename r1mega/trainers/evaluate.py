"""What a step's rollouts say (reward, accuracy, length, reflective words, logprob mismatch), and
held-out accuracy through the same engine and scorer."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from r1mega.ops.rollout_correction import mismatch_kl
from r1mega.rollout.engine import raise_refused
from r1mega.data.reflection import reflective_word_count


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
        metrics["rollout/mismatch_kl"] = mismatch_kl(batch.old_logp, batch.engine_logp, batch.mask)
    return metrics


def generate_and_score(engine, tokenizer, rows: Sequence[Mapping[str, Any]], scorer, sampling):
    """(`sampling.n` samples per question, flat, question after question; their scores)."""
    groups = engine.generate([tokenizer.encode(r["prompt"]) for r in rows], sampling)
    raise_refused(groups, rows)
    samples = [s for group in groups for s in group]
    return samples, scorer.score([s.text for s in samples], [r for r in rows for _ in range(sampling.n)])


def eval_metrics(samples, scores, prefix: str = "eval/") -> dict[str, float]:
    """Held-out accuracy, reward, response length and reflective words of `generate_and_score`'s samples
    (gathered from every data-parallel rank when they were generated in shares), keys under `prefix`."""
    accuracy = accuracy_of(scores.components) or [0.0] * len(samples)
    return {
        f"{prefix}accuracy": sum(accuracy) / len(accuracy),
        f"{prefix}reward": float(torch.as_tensor(scores.rewards, dtype=torch.float32).mean()),
        f"{prefix}response_length": sum(len(s.token_ids) for s in samples) / len(samples),
        f"{prefix}reflective_words": sum(reflective_word_count(s.text) for s in samples) / len(samples),
    }


_SPLITS = {"eval": "held-out", "eval_hard": "held-out, harder"}
_SHOWN = (("accuracy", "pass@1", "{:.3f}"), ("greedy_accuracy", "greedy", "{:.3f}"),
          ("response_length", "length", "{:.1f}"), ("reflective_words", "reflective words", "{:.2f}"))


def held_out_report(metrics: Mapping[str, float], before: Mapping[str, float] | None = None) -> list[str]:
    """One line per held-out split of `evaluate`'s metrics, each value as `before -> after` when the
    metrics before RL are given: "held-out: pass@1 0.125 -> 0.891, greedy ..."."""
    lines = []
    for split, title in _SPLITS.items():
        shown = []
        for key, name, form in _SHOWN:
            value = metrics.get(f"{split}/{key}")
            if value is None:
                continue
            start = None if before is None else before.get(f"{split}/{key}")
            shown.append(f"{name} {form.format(value)}" if start is None
                         else f"{name} {form.format(start)} -> {form.format(value)}")
        if shown:
            lines.append(f"{title}: " + ", ".join(shown))
    return lines
