"""The algorithms beside GRPO inside the trainer: DAPO's dynamic sampling trains on the first groups whose
rewards vary, in the order generated, and its overlong shaping adds the length penalty to their rewards;
each preset runs; rollout correction with an engine that matches the trainer changes nothing."""

import dataclasses

import pytest
import torch

import r1mega.trainers.grpo as grpo
from r1mega.trainers.grpo import GRPOTrainer
from grpo_runs import grpo_config, grpo_steps

G = 4


def test_dapo_trains_on_the_first_varied_groups_with_the_length_penalty(tmp_path, monkeypatch):
    trained = []
    real_update = grpo.update_policy
    monkeypatch.setattr(grpo, "update_policy", lambda model, optimizer, batch, *a, **k: (
        trained.append(batch), real_update(model, optimizer, batch, *a, **k))[1])
    cfg = grpo_config(tmp_path, "algo=dapo", "algo.train_batch_size=2", "algo.max_sampling_rounds=4",
                      "algo.overlong_buffer=0.5", "rollout.max_new_tokens=[[0,6]]")
    trainer = GRPOTrainer(cfg)
    real_score, rounds = trainer.scorer.score, []

    def score(texts, rows):  # a question with an odd answer scores 0 on every sample: its group is dropped
        scores = real_score(texts, rows)
        rewards = [0.0 if int(row["answer"]) % 2 else r for r, row in zip(scores.rewards, rows)]
        rounds.append(([row["answer"] for row in rows], rewards))
        return dataclasses.replace(scores, rewards=rewards)

    trainer.scorer.score = score
    try:
        metrics = [trainer.train_step() for _ in range(3)]
    finally:
        trainer.scorer.close()
    for step, batch in zip(metrics, trained):
        generated = rounds[:int(step["dynamic_sampling/rounds"])]
        del rounds[:len(generated)]
        groups = [rewards[g:g + G] for _, rewards in generated for g in range(0, len(rewards), G)]
        varied = [group for group in groups if len(set(group)) > 1]
        assert step["dynamic_sampling/varied_groups"] == len(varied)
        want = varied[:2] + [group for group in groups if len(set(group)) == 1][:2 - len(varied[:2])]
        assert len(generated) == 4 or len(varied) >= 2  # stopped at the cap or with enough
        lengths = batch.mask.sum(1)
        penalty = torch.where(lengths <= 3, 0.0, (3 - lengths) / 3)  # L_max 6, buffer 3: DAPO's R_length
        torch.testing.assert_close(batch.rewards, torch.tensor(want).flatten() + penalty)
        assert step["reward/overlong_penalty"] == pytest.approx(float(penalty.mean()))
    assert any(step["dynamic_sampling/rounds"] > 1 for step in metrics)  # a round was short and refilled


@pytest.mark.parametrize("preset", ["dapo", "gspo", "rloo", "reinforce_pp"])
def test_presets_train(preset):
    steps, _ = grpo_steps(f"algo={preset}", steps=2)
    for step in steps:
        assert torch.isfinite(torch.tensor(step["train/loss"]))
        assert step["rollout/mismatch_kl"] < 1e-6  # the fp32 native engine holds the trainer's weights
    assert steps[0]["train/grad_norm"] > 0


def test_correction_with_a_matching_engine_changes_nothing():
    # Engine and trainer in fp32 with the same weights: every ratio pi_old / pi_engine is 1 to rounding, so
    # the weights are 1, nothing is masked, and the steps are the uncorrected ones.
    plain, _ = grpo_steps(steps=2)
    corrected, _ = grpo_steps("algo.correction.weights=token", "algo.correction.mask=sequence", steps=2)
    for a, b in zip(plain, corrected):
        assert b["correction/masked_tokens"] == 0.0 and b["correction/weight_mean"] == pytest.approx(1.0, abs=1e-5)
        for key in ("reward/mean", "train/loss", "train/grad_norm", "train/kl"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), key
