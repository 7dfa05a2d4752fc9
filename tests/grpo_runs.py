"""A few GRPO steps of the trainer on a tiny random model with a reward it can earn (the share of
digits in its completion), for tests that compare two ways of running the same steps."""

from __future__ import annotations

import tempfile

import reward_helpers  # noqa: F401  (registers test_digit_share)

TINY = ["model.init=random", "data.task=arithmetic", "data.train_size=64", "data.test_size=4",
        "algo.train_batch_size=2", "algo.group_size=4", "algo.ppo_mini_batch_size=2", "algo.lr=1e-3", "algo.beta=0.01", "algo.ref_reset_every=2",
        "rollout.max_new_tokens=[[0,6]]", "train.eval_sampling.max_new_tokens=0", "data.hard_difficulty=null",
        "train.progress=false", "train.tensorboard=false"]


def grpo_config(out_dir, *overrides: str):
    """The trainer's config as r1mega-train composes it from TINY + overrides, rewarding digits."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from r1mega.cli.train import CONF_DIR
    from r1mega.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose("config", overrides=[*TINY, *overrides, f"train.out_dir={out_dir}"]))
    cfg.reward.components = {"test_digit_share": 1.0}
    return cfg


def grpo_steps(*overrides: str, steps: int = 3) -> tuple[list[dict], type]:
    """Per-rollout metrics of `steps` rollouts (one optimizer step each) with TINY + overrides, and the
    policy's type."""
    from r1mega.trainers.grpo import GRPOTrainer

    with tempfile.TemporaryDirectory() as out:
        trainer = GRPOTrainer(grpo_config(out, *overrides))
        try:
            return [trainer.train_step() for _ in range(steps)], type(trainer.policy)
        finally:
            trainer.scorer.close()


def assert_same_steps(native: list[dict], other: list[dict], rel: float) -> None:
    """Same rollouts (rewards, lengths, expert loads: the engines got equal weights) and loss statistics
    within `rel`."""
    import pytest

    for step, (a, b) in enumerate(zip(native, other)):
        for key in ("reward/mean", "response_length/mean", "moe/max_over_mean_load"):
            assert b.get(key) == a.get(key), (step, key)
        for key in ("train/loss", "train/grad_norm", "train/kl"):
            assert b[key] == pytest.approx(a[key], rel=rel, abs=1e-7), (step, key)
        assert b["rollout/logprob_mismatch"] < 1e-5
    assert native[0]["train/grad_norm"] > 0.1  # the reward gives a signal to follow


def plain_logprobs(model, prompt: list[int], response: list[int]):
    """Logprob [n] of each response token: one unpacked forward over prompt + response, full logits,
    log-softmax (what the trainer's packed, vocabulary-chunked path must equal)."""
    import torch

    logits = model(torch.tensor([prompt + response]))[0].float()  # [T, V]
    logp = logits[len(prompt) - 1:-1].log_softmax(-1)  # the positions that predict the response
    return logp.gather(-1, torch.tensor(response)[:, None])[:, 0]
