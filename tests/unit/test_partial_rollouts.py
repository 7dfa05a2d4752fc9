"""Partial rollouts: generation in segments, unfinished questions carried to the next rollout with the
logprobs and weight versions of the tokens they have; a greedy generation in segments equals one in one
go; and in the one-step-off trainer every token's engine logprob is that of the weights it was sampled
with (recomputed here by a plain forward of each weight version), some samples spanning two."""

import copy
import dataclasses

import pytest
import torch

import r1mega.trainers.grpo as grpo
from r1mega.rollout.engine import Sample, SamplingParams
from r1mega.trainers.grpo import GRPOTrainer
from r1mega.trainers.partial_rollouts import PartialRollouts
from grpo_runs import grpo_config, plain_logprobs

# Question q's sample j stops after LENGTHS[q][j] tokens.
LENGTHS = {0: [1, 2], 1: [5, 6], 2: [2, 2], 3: [3, 1], 4: [1, 1], 5: [6, 6]}


class StubEngine:
    """Prompt [q] (fresh) or [q, tokens...] (a continuation); the tokens of sample j are 10 j + version,
    their logprobs -version."""

    def __init__(self):
        self.version, self.calls = 0, []

    def generate(self, prompts, params):
        out = []
        for prompt, p in zip(prompts, params):
            self.calls.append((len(prompt), p.n, p.max_new_tokens))
            q, done = prompt[0], len(prompt) - 1
            samples = []
            for j in (range(p.n) if done == 0 else [prompt[1] // 10]):
                k = min(p.max_new_tokens, LENGTHS[q][j] - done)
                samples.append(Sample(prompt_ids=prompt, token_ids=[10 * j + self.version] * k,
                                      logprobs=[-float(self.version)] * k,
                                      finish_reason="stop" if done + k == LENGTHS[q][j] else "length"))
            out.append(samples)
        return out


def test_batches_are_the_first_finished_questions_and_the_rest_carry_on():
    engine = StubEngine()
    partial = PartialRollouts(engine, None, batch_size=2, extra=2, segment=2)
    sampling = SamplingParams(n=2, max_new_tokens=6, seed=7)
    assert partial.need() == 4
    partial.add([{"q": q} for q in range(4)], [[q] for q in range(4)], 2)
    groups, rows, metrics = partial.run(sampling)  # one segment: questions 0 and 2 are done
    assert rows == [{"q": 0}, {"q": 2}] and metrics["partial/segments"] == 1 and metrics["partial/carried"] == 2
    assert [len(s.token_ids) for g in groups for s in g] == [1, 2, 2, 2]
    engine.version = 1  # a weight update between the rollouts
    assert partial.need() == 2
    partial.add([{"q": 4}, {"q": 5}], [[4], [5]], 2)
    engine.calls.clear()
    groups, rows, metrics = partial.run(sampling)
    assert rows == [{"q": 3}, {"q": 4}]  # oldest first: 3 (carried) finished in this segment, 1 did not
    carried = groups[0][0]  # question 3, sample 0: 2 tokens of version 0, then 1 of version 1
    assert carried.token_ids == [0, 0, 1] and carried.logprobs == [0.0, 0.0, -1.0] and carried.prompt_ids == [3]
    assert carried.finish_reason == "stop" and groups[0][1].token_ids == [10]
    assert metrics["partial/multi_version_samples"] == 1  # of 4 samples
    # continuations: one request per unfinished sample (prompt + its tokens, n = 1, what the budget leaves)
    assert (3, 1, 2) in engine.calls and (3, 1, 2) in engine.calls and (1, 2, 2) in engine.calls
    assert [q.row for q in partial.pool] == [{"q": 1}, {"q": 5}]


def test_greedy_generation_in_segments_equals_one_go(tmp_path):
    trainer = GRPOTrainer(grpo_config(tmp_path))
    try:
        engine, tokenizer = trainer.engine, trainer.tokenizer
        prompts = [tokenizer.encode(r["prompt"]) for r in trainer.prompts.take(3)]
        sampling = SamplingParams(n=2, temperature=0.0, max_new_tokens=7, stop_token_ids=[tokenizer.eos_token_id])
        whole = engine.generate(prompts, sampling)
        partial = PartialRollouts(engine, tokenizer, batch_size=3, extra=0, segment=2)
        partial.add([{}] * 3, prompts, 2)
        groups, _, metrics = partial.run(sampling)
    finally:
        trainer.scorer.close()
    assert metrics["partial/segments"] == 4  # 2 + 2 + 2 + 1 tokens
    for got, want in zip((s for g in groups for s in g), (s for g in whole for s in g)):
        assert got.token_ids == want.token_ids and got.text == want.text and got.finish_reason == want.finish_reason
        # a continuation prefills what incremental decoding cached: fp32 rounding apart
        torch.testing.assert_close(torch.tensor(got.logprobs), torch.tensor(want.logprobs), rtol=0, atol=1e-5)


def test_one_step_off_partial_rollouts_keep_each_tokens_engine_logprob(tmp_path, monkeypatch):
    trained = []
    real_update = grpo.update_policy
    monkeypatch.setattr(grpo, "update_policy", lambda model, optimizer, batch, *a, **k: (
        trained.append(batch), real_update(model, optimizer, batch, *a, **k))[1])
    trainer = GRPOTrainer(grpo_config(tmp_path, "rollout.staleness=1", "rollout.partial_tokens=2",
                                      "rollout.partial_groups=4", "algo.lr=3e-2"))
    engine, apply = trainer.engine, trainer.engine.update_weights
    # A third of the vocabulary ends a sample (a random model would otherwise run every sample to the budget,
    # in step with every other): lengths vary, so questions finish in different rollouts.
    real_sampling = trainer.sampling
    monkeypatch.setattr(trainer, "sampling", lambda index=None: dataclasses.replace(
        real_sampling(index), stop_token_ids=list(range(0, engine.config.vocab_size, 3))))
    weights = [copy.deepcopy(engine.model)]  # the engine's weights of each version, in order

    def record(named_tensors, version):
        apply(named_tensors, version)
        weights.append(copy.deepcopy(engine.model))

    engine.update_weights = record
    try:
        metrics = [trainer.train_step() for _ in range(6)]
    finally:
        trainer.scorer.close()
    assert all(m["partial/carried"] == 4 for m in metrics)
    spanning = 0
    for batch in trained:
        for i, prompt in enumerate(batch.prompt_ids):
            n = int(batch.mask[i].sum())
            response = batch.response_ids[i, :n].tolist()
            per_version = torch.stack([plain_logprobs(model, prompt, response).detach() for model in weights])
            distance = (per_version - batch.engine_logp[i, :n]).abs()  # [versions, n]
            assert bool((distance.min(0).values < 1e-4).all()), "a token's engine logprob is no version's"
            version = distance.argmin(0)
            assert bool((version[1:] >= version[:-1]).all())  # later tokens, later weights
            spanning += int(version[-1] > version[0])
    assert spanning > 0 and any(m["partial/multi_version_samples"] > 0 for m in metrics)


def test_routing_replay_with_partial_rollouts_is_refused_naming_both_keys():
    from r1mega.config import AlgoConfig, RolloutConfig
    from r1mega.trainers.rollout_source import check_rollout_config

    with pytest.raises(ValueError, match=r"algo\.routing_replay.*rollout\.partial_tokens"):
        check_rollout_config(RolloutConfig(partial_tokens=8), AlgoConfig(routing_replay=True), dp_size=1)
    check_rollout_config(RolloutConfig(partial_tokens=8), AlgoConfig(), dp_size=1)  # either alone runs
    check_rollout_config(RolloutConfig(), AlgoConfig(routing_replay=True), dp_size=1)
