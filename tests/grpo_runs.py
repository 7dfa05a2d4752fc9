"""A few GRPO steps of the trainer on a tiny random model with a reward it can earn (the share of
digits in its completion), for tests that compare two ways of running the same steps."""

from __future__ import annotations

import tempfile

import reward_helpers  # noqa: F401  (registers test_digit_share)

TINY = ["model.init=random", "data.train_size=64", "data.test_size=4", "algo.questions_per_step=2",
        "algo.group_size=4", "algo.mini_batches=1", "algo.lr=1e-3", "algo.beta=0.01", "algo.ref_reset_every=2",
        "rollout.max_new_tokens=[[0,6]]",
        "train.progress=false", "train.tensorboard=false"]


def grpo_steps(*overrides: str, steps: int = 3) -> tuple[list[dict], type]:
    """Per-step metrics of `steps` trainer steps with TINY + overrides, and the policy's type."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from r1mega.cli.train import CONF_DIR
    from r1mega.config import register_configs
    from r1mega.trainers.grpo import GRPOTrainer

    register_configs()
    with tempfile.TemporaryDirectory() as out, initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose("config", overrides=[*TINY, *overrides, f"train.out_dir={out}"]))
        cfg.reward.components = {"test_digit_share": 1.0}
        trainer = GRPOTrainer(cfg)
        try:
            return [trainer.train_step() for trainer.step in range(steps)], type(trainer.policy)
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
