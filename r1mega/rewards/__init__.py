"""Rewards: rule-based graders (maths, code, format, language), reward models, their registry and
composition, the code sandbox and the scoring pool.

    fn(completion: str, sample: Mapping) -> RewardOutput(score, reason)   registered by name
    ScoringPool([(name, weight), ...], num_workers, timeout).score(completions, samples) -> ScoreResult

Importing this package registers every reward (the pool's workers rely on it).
Deliberately left out: anything that knows a model's internals (reward_model.py uses only the
`Transformer`'s public `forward(..., return_hidden=True)`).
"""

from r1mega.rewards.registry import (
    RULE, RewardFn, RewardOutput, RewardSpec, all_scenario, compose, get_reward, register_reward,
    registered_rewards, weighted_sum,
)
from r1mega.rewards import code, countdown, format, language, math_accuracy, reward_model  # noqa: F401  (registration)
from r1mega.rewards.pool import ScoreResult, ScoringPool

__all__ = [
    "RULE", "RewardFn", "RewardOutput", "RewardSpec", "ScoreResult", "ScoringPool", "all_scenario", "compose",
    "get_reward", "register_reward", "registered_rewards", "weighted_sum",
]
