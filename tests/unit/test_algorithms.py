"""The algorithms beside the paper's GRPO against their papers' formulas, written here sample by sample:
RLOO's leave-one-out baseline, REINFORCE++'s batch whitening, DAPO's overlong shaping and dynamic
sampling, and GSPO's sequence ratio through the trainer's update (against plain PyTorch over full logits)."""

import copy
import math
import random
import statistics

import pytest
import torch

from r1mega.config import AlgoConfig
from r1mega.ops.outcome_advantages import reinforce_pp_advantages, rloo_advantages
from r1mega.rewards.overlong import overlong_penalty
from r1mega.trainers.dynamic_sampling import collect_groups, varied_groups
from r1mega.trainers.policy_update import update_policy
from grpo_runs import plain_logprobs
from test_policy_update import _batch, _model

REWARDS = [1.0, 0.0, 0.5, 1.0, 0.2, 0.2, 0.9, 0.0, 1.0]  # three groups of three
LENGTHS = [3, 5, 1, 2, 8, 4, 6, 1, 2]


def test_rloo_baseline_is_the_mean_of_the_others():
    got = rloo_advantages(torch.tensor(REWARDS), group_size=3)
    for i, r in enumerate(REWARDS):
        group = REWARDS[i // 3 * 3:i // 3 * 3 + 3]
        others = [v for j, v in enumerate(group) if j != i % 3]
        assert float(got[i]) == pytest.approx(r - sum(others) / len(others), abs=1e-6)


@pytest.mark.parametrize("baseline", [False, True])
def test_reinforce_pp_whitens_over_the_batch_tokens(baseline):
    mask = torch.zeros(9, 8)
    for i, n in enumerate(LENGTHS):
        mask[i, :n] = 1
    got = reinforce_pp_advantages(torch.tensor(REWARDS), mask, group_size=3 if baseline else None)
    returns = [r - statistics.fmean(REWARDS[i // 3 * 3:i // 3 * 3 + 3]) if baseline else r for i, r in enumerate(REWARDS)]
    tokens = [ret for ret, n in zip(returns, LENGTHS) for _ in range(n)]  # every token carries its sample's return
    mu, var = statistics.fmean(tokens), statistics.variance(tokens)  # the variance with n - 1, as REINFORCE++'s
    for i, ret in enumerate(returns):
        assert float(got[i]) == pytest.approx((ret - mu) / math.sqrt(var + 1e-8), rel=1e-5, abs=1e-6)


def test_overlong_penalty_is_dapos_piecewise_formula():
    max_len, buffer = 20, 4
    lengths = torch.arange(0, 23)
    got = overlong_penalty(lengths, max_len=max_len, buffer=buffer, factor=0.5)
    for n in range(23):
        if n <= max_len - buffer:
            want = 0.0
        elif n <= max_len:
            want = ((max_len - buffer) - n) / buffer
        else:
            want = -1.0
        assert float(got[n]) == pytest.approx(0.5 * want), n
    assert float(got[max_len]) == pytest.approx(-0.5)  # the whole buffer used: the full penalty


def test_dynamic_sampling_keeps_groups_with_varied_rewards():
    # Round r returns 4 groups of 2; the all-equal ones (every other group) are dropped.
    calls = []

    def generate(round_index):
        calls.append(round_index)
        names = [f"r{round_index}g{g}" for g in range(4)]
        rewards = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [0.0, 0.0]]).flatten()
        return names, rewards

    assert varied_groups(torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0]), 2) == [0, 2]
    chosen, metrics = collect_groups(generate, batch_size=4, group_size=2, max_rounds=5)
    assert chosen == ["r0g0", "r0g2", "r1g0", "r1g2"] and calls == [0, 1]
    assert metrics == {"dynamic_sampling/rounds": 2.0, "dynamic_sampling/varied_groups": 4.0,
                       "dynamic_sampling/filled_groups": 0.0}
    # The cap: one round only, so the batch is filled with the dropped groups.
    chosen, metrics = collect_groups(generate, batch_size=4, group_size=2, max_rounds=1)
    assert chosen == ["r0g0", "r0g2", "r0g1", "r0g3"] and metrics["dynamic_sampling/filled_groups"] == 2.0


def test_gspo_update_matches_the_sequence_ratio_loss():
    # GSPO (Zheng et al. 2025, eq. 5-7): s_b = exp(mean_t (logp - old)), clipped to [1 - eps_low, 1 + eps_high],
    # -min(s_b A_b, clip(s_b) A_b) per sequence (each token's gradient the sequence's), mean over sequences;
    # no KL. Written with the sequence ratio itself, not the token stand-in the trainer uses.
    low, high = 0.03, 0.04
    model, batch = _model(), _batch()
    algo = AlgoConfig(train_batch_size=2, ppo_mini_batch_size=2, group_size=4, token_budget=20, ratio="sequence",
                      clip_low=low, clip_high=high, beta=0.0, grad_clip=1e9)
    policy = copy.deepcopy(model)
    got = update_policy(policy, torch.optim.SGD(policy.parameters(), lr=0.0), batch, algo, max_new_tokens=16,
                        temperature=1.0, device="cpu", generator=random.Random(0)).stats
    total, clipped = 0.0, 0
    for i, prompt in enumerate(batch.prompt_ids):
        n = int(batch.mask[i].sum())
        logp = plain_logprobs(model, prompt, batch.response_ids[i, :n].tolist())
        s = torch.exp((logp - batch.old_logp[i, :n]).mean())
        advantage = batch.advantages[i]
        total = total - torch.minimum(s * advantage, s.clamp(1 - low, 1 + high) * advantage)
        clipped += n * bool((advantage > 0 and s > 1 + high) or (advantage < 0 and s < 1 - low))
    loss = total / len(batch)
    loss.backward()
    assert got["train/loss"] == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
    assert got["train/clip_fraction"] == pytest.approx(clipped / float(batch.mask.sum()))
    assert 0 < got["train/clip_fraction"] < 1  # some sequences clipped, some not
    for (name, want), param in zip(model.named_parameters(), policy.parameters()):
        torch.testing.assert_close(param.grad, want.grad, rtol=1e-4, atol=1e-6, msg=name)
