"""A GRPO step is the paper's: one optimizer step on one mini-batch of `ppo_mini_batch_size` questions'
samples, a rollout of `train_batch_size` questions making train_batch_size / ppo_mini_batch_size of
them. The step counter, the learning-rate schedule, the reference reset, the length schedule, metrics
and checkpoints all count these steps; AdamW's own step count is the independent witness."""

import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import r1mega.trainers.grpo as grpo
from grpo_runs import grpo_config
from r1mega.cli.train import CONF_DIR
from r1mega.config import register_configs
from r1mega.trainers.policy_update import steps_per_rollout


def test_r1_zero_counts_the_papers_steps():
    # The paper (R1-Zero): "each rollout generates 8,192 outputs, which are randomly split into 16
    # minibatches"; "each training step consists of 32 unique questions, ... batch size of 512 per
    # step"; 10,400 steps, the reference replaced every 400, the length switched at the 8.2k step.
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose("config", overrides=["experiment=r1_zero"]))
    algo = cfg.algo
    assert algo.train_batch_size * algo.group_size == 8192
    assert algo.ppo_mini_batch_size * algo.group_size == 512 and algo.ppo_mini_batch_size == 32
    assert steps_per_rollout(algo) == 16 and algo.inner_epochs == 1
    assert cfg.train.steps == 10400 and algo.ref_reset_every == 400 and algo.lr == 3e-6
    assert cfg.rollout.max_new_tokens == [[0, 32768], [8200, 65536]]


def _cosine_after_warmup(step: int, *, warmup: int, total: int) -> float:
    """Linear warm-up over `warmup` steps, then a cosine from 1 to 0 at `total`, per optimizer step."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))


def test_steps_schedules_checkpoints_and_metrics_count_optimizer_steps(tmp_path, monkeypatch):
    # Rollouts of 4 questions x 2 samples, one question's samples per step: 4 steps a rollout. 10 steps:
    # rollouts at steps 0 and 4, then one that stops after 2 of its steps. The length drops from 6 to 3
    # tokens at step 5: from the rollout that starts at step 8. The reference is replaced at step 8.
    cfg = grpo_config(tmp_path, "algo.train_batch_size=4", "algo.ppo_mini_batch_size=1", "algo.group_size=2",
                      "algo.ref_reset_every=8", "algo.schedule=cosine", "algo.warmup_steps=2", "algo.lr=1e-3",
                      "algo.beta=0.1", "algo.agg=seq-mean-token-sum-norm", "rollout.max_new_tokens=[[0,6],[5,3]]",
                      "train.steps=10", "train.save_every=8", "train.eval_every=100")
    trainer = grpo.GRPOTrainer(cfg)
    prompts, updates = [], []
    generate = trainer.engine.generate

    def counting_generate(batch, sampling):
        if sampling.n == cfg.algo.group_size:  # not the held-out evaluation
            prompts.append((len(batch), sampling.max_new_tokens))
        return generate(batch, sampling)

    def recording_update(policy, optimizer, batch, algo, **kw):
        same = all(torch.equal(a, b) for a, b in zip(trainer.reference.state_dict().values(),
                                                     policy.state_dict().values()))
        updates.append(dict(lr=optimizer.param_groups[0]["lr"], max_new_tokens=kw["max_new_tokens"],
                            steps=kw["steps"], reference_is_policy=same))
        return update_policy(policy, optimizer, batch, algo, **kw)

    update_policy = grpo.update_policy
    trainer.engine.generate = counting_generate
    monkeypatch.setattr(grpo, "update_policy", recording_update)
    try:
        trainer.fit()
    finally:
        trainer.scorer.close()

    assert trainer.step == 10 and trainer.rollout == 3
    adam_steps = {float(state["step"]) for state in trainer.optimizer.state.values()}
    assert adam_steps == {10.0}  # every parameter took 4 + 4 + 2 optimizer steps
    assert prompts == [(4, 6), (4, 6), (4, 3)]
    assert [u["max_new_tokens"] for u in updates] == [6, 6, 3]  # Dr. GRPO's divisor: the rollout's budget
    assert [u["steps"] for u in updates] == [4, 4, 2]
    for u, first_step in zip(updates, (0, 4, 8)):
        assert u["lr"] == pytest.approx(1e-3 * _cosine_after_warmup(first_step, warmup=2, total=10), rel=1e-12)
    # The first step starts from the reference; the reset after step 8 makes it the policy again.
    assert [u["reference_is_policy"] for u in updates] == [True, False, True]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [4, 8, 10]  # one row a rollout, keyed by the steps done
    assert rows[-1]["lr"] == 0.0  # the cosine ends at train.steps
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_10", "step_8"]
    assert (checkpoints / "latest").read_text().strip() == "step_10"


def test_sizes_that_do_not_split_into_whole_steps_are_refused(tmp_path):
    with pytest.raises(ValueError, match="algo.train_batch_size=3 must be a multiple of algo.ppo_mini_batch_size=2"):
        grpo.GRPOTrainer(grpo_config(tmp_path, "algo.train_batch_size=3", "algo.ppo_mini_batch_size=2"))
    with pytest.raises(ValueError, match="algo.ref_reset_every=3 must be a multiple of the steps of a rollout"):
        grpo.GRPOTrainer(grpo_config(tmp_path, "algo.ppo_mini_batch_size=1", "algo.ref_reset_every=3"))
