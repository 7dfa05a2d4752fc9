"""A GRPO run for test_grpo_data_parallel.py, as `r1mega-train` runs it (one process, or one rank under
torchrun), with a reward a random tiny model can earn: the share of digits in its completion.
argv: the run's out_dir, then Hydra overrides."""

import sys

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import reward_helpers  # noqa: F401  (registers test_digit_share)
from r1mega.cli.train import CONF_DIR
from r1mega.config import register_configs
from r1mega.trainers.grpo import train


def config(argv: list[str]):
    """The run's config from argv (out_dir, then overrides)."""
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose("config", overrides=[f"train.out_dir={argv[0]}", *argv[1:]]))
    # math_accuracy adds the `accuracy` metric (always 0 for a random model); the digits give the signal.
    cfg.reward.components = {"test_digit_share": 1.0, "math_accuracy": 1.0}
    return cfg


if __name__ == "__main__":
    train(config(sys.argv[1:]))
