"""The trainer's held-out evaluation follows the paper's protocol: on every held-out split (the
training difficulty and the harder one), k=4 samples at temperature 0.6 and top-p 0.95 for pass@1,
plus one greedy response; the metrics are recomputed here from the engine's own samples."""

from __future__ import annotations

import re
import tempfile

from grpo_runs import grpo_config

ANSWER = re.compile(r"<answer>\s*(\S+?)\s*</answer>")


def test_every_split_is_sampled_at_k4_t06_top_p095_and_greedily():
    from r1mega.trainers.grpo import GRPOTrainer

    with tempfile.TemporaryDirectory() as out:
        cfg = grpo_config(out, "data.task=chain", "data.difficulty=2", "data.hard_difficulty=4", "data.test_size=3",
                          "data.template=plain", "train.eval_sampling.max_new_tokens=9")
        cfg.reward.components = {"math_accuracy": 1.0, "format_r1_zero": 1.0}
        trainer = GRPOTrainer(cfg)
        calls, generate = [], trainer.engine.generate

        def recording(prompts, sampling):
            groups = generate(prompts, sampling)
            calls.append((prompts, sampling, groups))
            return groups

        trainer.engine.generate = recording
        try:
            metrics = trainer.evaluate()
        finally:
            trainer.scorer.close()

    settings = [(s.n, s.temperature, s.top_p, s.max_new_tokens) for _, s, _ in calls]
    assert settings == [(4, 0.6, 0.95, 9), (1, 0.0, 1.0, 9)] * 2
    for (prompts, _, groups), (split, operands) in zip(calls, [("eval", 3), ("eval", 3), ("eval_hard", 5),
                                                              ("eval_hard", 5)]):
        questions = [trainer.tokenizer.decode(p) for p in prompts]
        assert [len(re.findall(r"\d", q)) for q in questions] == [operands] * 3
        rows = {r["prompt"]: r["answer"] for r in trainer.held_out[split]}
        samples = [(rows[q], s) for q, group in zip(questions, groups) for s in group]
        name = "greedy_" if len(groups[0]) == 1 else ""
        right = [float(bool(m := ANSWER.search(s.text)) and m.group(1) == answer) for answer, s in samples]
        assert metrics[f"{split}/{name}accuracy"] == sum(right) / len(right)
        assert metrics[f"{split}/{name}response_length"] == sum(len(s.token_ids) for _, s in samples) / len(samples)
    assert set(trainer.held_out) == {"eval", "eval_hard"}
    assert not {r["prompt"] for r in trainer.held_out["eval"]} & {r["prompt"] for r in trainer.prompts.rows}
