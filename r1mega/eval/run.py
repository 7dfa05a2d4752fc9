"""n sampled responses per held-out question, graded, summarised per dataset.

`evaluate_rows` takes any engine that speaks the `Engine` protocol (r1mega/rollout) and rows holding a
rendered "prompt" and an "answer"; the samples are graded by the registered rewards through a
`ScoringPool` (correctness = every `*accuracy` component at full marks, as in the trainer), and the
final answer of each sample is extracted the way `math_accuracy` extracts it, for the vote.
`evaluate_model` builds a native engine around a model, sized for every dataset's prompts, and runs
every dataset through it; a prompt the engine refuses (past the model's max_position_embeddings) is an
error naming its row, never a wrong answer.
`load_eval_sets` turns dataset names into rows: a synthetic task name (its held-out split) or a
prompt file (jsonl/json/parquet, read by r1mega.data.datasets).

Deliberately left out: pass@k for k larger than the number of samples, code-execution datasets
(pass a `code_accuracy` reward and rows with "tests" yourself), and batching several checkpoints.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from r1mega.eval.passk import cons_at_k, pass_at_k
from r1mega.rewards import ScoringPool
from r1mega.rewards.math_accuracy import extract_answer
from r1mega.rollout.engine import SamplingParams, max_len_for, raise_refused
from r1mega.trainers.evaluate import accuracy_of


@dataclass
class EvalSettings(SamplingParams):
    """The paper's protocol: `n` samples per question at temperature 0.6, top-p 0.95; the model's EOS
    always stops a response."""

    n: int = 16
    temperature: float = 0.6
    top_p: float = 0.95
    max_new_tokens: int = 32768
    seed: int = 0
    pass_k: list[int] = field(default_factory=lambda: [1])  # pass@k values reported besides pass@1
    reward: dict[str, float] = field(default_factory=lambda: {"math_accuracy": 1.0})


def evaluate_rows(engine, tokenizer, rows: Sequence[Mapping[str, Any]], settings: EvalSettings,
                  scorer: ScoringPool) -> dict[str, float]:
    """pass@1 (mean over k samples), pass@k for each `settings.pass_k`, cons@k and response length."""
    k = settings.n
    sampling = dataclasses.replace(settings, stop_token_ids=[*settings.stop_token_ids, tokenizer.eos_token_id])
    groups = engine.generate([tokenizer.encode(r["prompt"]) for r in rows], sampling)
    raise_refused(groups, rows)
    texts = [s.text for group in groups for s in group]
    scores = scorer.score(texts, [r for r in rows for _ in range(k)])
    correct = accuracy_of(scores.components)
    if correct is None:
        raise ValueError(f"evaluation rewards {sorted(scores.components)} hold no '*accuracy' component")
    out: dict[str, float] = {"questions": float(len(rows)), "samples_per_question": float(k)}
    per_question = [correct[q * k:(q + 1) * k] for q in range(len(rows))]
    for j in sorted({1, *settings.pass_k}):
        if j <= k:
            out[f"pass@{j}"] = _mean([pass_at_k(k, int(sum(c)), j) for c in per_question])
    out[f"cons@{k}"] = _mean([cons_at_k([extract_answer(t) for t in texts[q * k:(q + 1) * k]], per_question[q])
                              for q in range(len(rows))])
    out["response_length"] = _mean([float(len(s.token_ids)) for group in groups for s in group])
    out["truncated"] = _mean([float(s.finish_reason == "length") for group in groups for s in group])
    return out


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def load_eval_sets(names: Sequence[str], *, template: str, size: int, difficulty: int,
                   seed: int) -> dict[str, list[dict[str, Any]]]:
    """name -> rows with the rendered "prompt" (and the bare "question"); at most `size` rows each."""
    from r1mega.data.datasets import load_prompt_dataset
    from r1mega.data.tasks import TASKS, make_task_dataset
    from r1mega.data.templates import get_template

    render = get_template(template)
    sets = {}
    for name in names:
        if name in TASKS:
            rows = make_task_dataset(name, split="test", size=size, difficulty=difficulty, seed=seed)
        else:
            rows = load_prompt_dataset(name)[:size]
            name = Path(name).stem
        sets[name] = [{**row, "question": row["prompt"], "prompt": render(row["prompt"])} for row in rows]
    return sets


def evaluate_model(model, tokenizer, datasets: Mapping[str, Sequence[Mapping[str, Any]]], settings: EvalSettings,
                   *, device="cpu", max_slots: int = 256) -> dict[str, dict[str, float]]:
    """dataset name -> metrics, for `model` served by a private native engine."""
    from r1mega.rollout.native import NativeEngine

    prompts = {name: [tokenizer.encode(r["prompt"]) for r in rows] for name, rows in datasets.items()}
    max_len = max_len_for(prompts, settings.max_new_tokens, model.config.max_position_embeddings,
                          key="sampling.max_new_tokens")
    engine = NativeEngine(model, tokenizer, max_slots=max_slots, max_len=max_len, device=device)
    with ScoringPool(settings.reward) as scorer:
        return {name: evaluate_rows(engine, tokenizer, rows, settings, scorer) for name, rows in datasets.items()}
