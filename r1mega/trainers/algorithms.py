"""The choices of `algo.*` beside the paper's GRPO (r1mega/config.py), in the order a step applies them:
checked before any work, rewards shaped, advantages, rollout correction. The maths is in r1mega/ops
(outcome_advantages, rollout_correction, sequence_ratio) and r1mega/rewards/overlong.py; this file
only picks it. The defaults leave the paper's GRPO exactly as it was: group mean/std advantages from
the fused op, token ratios, no shaping, no correction.
"""

from __future__ import annotations

import torch

from r1mega.ops.group_advantages import group_advantages
from r1mega.ops.grpo_loss import RATIOS
from r1mega.ops.outcome_advantages import reinforce_pp_advantages, rloo_advantages
from r1mega.ops.rollout_correction import MASK_LEVELS, WEIGHT_LEVELS, importance_weights, rejection_mask
from r1mega.rewards.overlong import overlong_penalty
from r1mega.trainers.rollout_batch import RolloutBatch

ADVANTAGES = ("grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline")


def check_algo(algo) -> None:
    """A clear error naming the key of any choice that cannot run."""
    choices = {"algo.advantage": (algo.advantage, ADVANTAGES), "algo.ratio": (algo.ratio, RATIOS),
               "algo.correction.weights": (algo.correction.weights, WEIGHT_LEVELS),
               "algo.correction.mask": (algo.correction.mask, MASK_LEVELS)}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ValueError(f"{key}={value!r} must be one of {allowed}")
    if algo.advantage == "rloo" and algo.group_size < 2:
        raise ValueError(f"algo.advantage=rloo needs algo.group_size >= 2, got {algo.group_size}")
    if algo.max_sampling_rounds < 1:
        raise ValueError(f"algo.max_sampling_rounds={algo.max_sampling_rounds} must be >= 1 (the first round counts)")
    if not 0.0 <= algo.overlong_buffer <= 1.0:
        raise ValueError(f"algo.overlong_buffer={algo.overlong_buffer} is a share of max_new_tokens, in [0, 1]")
    for key in ("weight_cap", "mask_threshold"):
        if not getattr(algo.correction, key) > 1.0:
            raise ValueError(f"algo.correction.{key}={getattr(algo.correction, key)} must be > 1")


def corrects_rollouts(algo) -> bool:
    """Whether the loss needs pi_old before it runs (importance weights or a rejection mask)."""
    return algo.correction.weights != "none" or algo.correction.mask != "none"


def shaped_rewards(rewards: torch.Tensor, lengths: torch.Tensor, algo, max_new_tokens: int):
    """(rewards [S] with DAPO's overlong penalty when algo.overlong_buffer > 0, metrics)."""
    if algo.overlong_buffer == 0:
        return rewards, {}
    buffer = max(1, round(algo.overlong_buffer * max_new_tokens))
    penalty = overlong_penalty(lengths, max_len=max_new_tokens, buffer=buffer, factor=algo.overlong_penalty)
    return rewards + penalty, {"reward/overlong_penalty": float(penalty.mean())}


def advantages(rewards: torch.Tensor, mask: torch.Tensor, algo) -> torch.Tensor:
    """Advantages [S] of the rewards [S] (samples in groups of algo.group_size) by algo.advantage."""
    if algo.advantage == "grpo":
        return group_advantages(rewards, group_size=algo.group_size, eps=algo.adv_eps, scale_by_std=algo.scale_by_std)
    if algo.advantage == "rloo":
        return rloo_advantages(rewards, algo.group_size)
    baseline = algo.group_size if algo.advantage == "reinforce_pp_baseline" else None
    return reinforce_pp_advantages(rewards, mask, group_size=baseline)


def correct_rollouts(batch: RolloutBatch, correction) -> dict[str, float]:
    """Applies algo.correction to a batch with old logprobs and advantages: the importance weights
    multiply the advantages (so the policy term, not the KL term: for w > 0,
    min(r A w, clip(r) A w) = w min(r A, clip(r) A)), the rejection mask becomes the loss's mask.
    Returns the share of valid tokens masked and the weights' mean and truncated share."""
    stats = {}
    if correction.weights != "none":
        weights = importance_weights(batch.old_logp, batch.engine_logp, batch.mask, level=correction.weights,
                                     cap=correction.weight_cap)  # [S, R]
        valid = batch.mask != 0
        kept = weights[valid] if valid.any() else weights.new_zeros(1)
        stats["correction/weight_mean"] = float(kept.mean())
        stats["correction/truncated"] = float((kept >= correction.weight_cap).float().mean())
        adv = batch.advantages
        batch.advantages = (adv[:, None] if adv.dim() == 1 else adv) * weights
    if correction.mask != "none":
        batch.loss_mask = rejection_mask(batch.old_logp, batch.engine_logp, batch.mask, level=correction.mask,
                                         threshold=correction.mask_threshold)
        stats["correction/masked_tokens"] = float(1 - batch.loss_mask.sum() / batch.mask.sum().clamp(min=1))
    return stats
