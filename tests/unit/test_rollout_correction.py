"""Rollout correction against its formulas, written here element by element: TIS weights
min(pi_old / pi_engine, C) per token and per sequence, the masks that drop tokens or sequences whose
ratio lies outside [1/C, C], the k3 mismatch KL; and the trainer's update with them, against the
loss of plain PyTorch over full logits (the gradient of every parameter)."""

import copy
import math
import random

import pytest
import torch

from r1mega.config import AlgoConfig, CorrectionConfig
from r1mega.ops.rollout_correction import importance_weights, mismatch_kl, rejection_mask
from r1mega.trainers.algorithms import check_algo, correct_rollouts
from r1mega.trainers.policy_update import is_on_policy, update_policy
from grpo_runs import plain_logprobs
from test_policy_update import _batch, _model


def _logprobs():
    gen = torch.Generator().manual_seed(1)
    lengths = [4, 7, 1, 6]
    mask = torch.zeros(4, 7)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    engine = -2.0 + torch.randn(4, 7, generator=gen)
    old = engine + 0.6 * torch.randn(4, 7, generator=gen)  # ratios from ~0.2 to ~5
    return old * mask, engine * mask, mask, lengths


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_truncated_importance_weights(level):
    old, engine, mask, lengths = _logprobs()
    cap = 2.0
    w = importance_weights(old, engine, mask, level=level, cap=cap)
    for b, n in enumerate(lengths):
        sequence = math.prod(math.exp(old[b, t] - engine[b, t]) for t in range(n))
        for t in range(7):
            rho = math.exp(old[b, t] - engine[b, t]) if level == "token" else sequence
            want = min(rho, cap) if t < n else 0.0
            assert float(w[b, t]) == pytest.approx(want, rel=1e-6), (b, t)
    assert 0 < float((w == cap).sum()) < mask.sum()  # some truncated, not all


@pytest.mark.parametrize("level,threshold", [("token", 1.5), ("sequence", 2.0), ("geometric", 1.12)])
def test_rejection_masks(level, threshold):
    old, engine, mask, lengths = _logprobs()  # sequence ratios 1.60, 1.83, 0.42, 2.49; geometric 1.13, 1.09, 0.42, 1.16
    keep = rejection_mask(old, engine, mask, level=level, threshold=threshold)
    for b, n in enumerate(lengths):
        logs = [float(old[b, t] - engine[b, t]) for t in range(n)]
        for t in range(7):
            if level == "token":
                rho = math.exp(logs[t]) if t < n else 1.0
            elif level == "sequence":
                rho = math.exp(sum(logs))
            else:
                rho = math.exp(sum(logs) / n)
            want = 1.0 if t < n and 1 / threshold <= rho <= threshold else 0.0
            assert float(keep[b, t]) == want, (b, t)
    assert 0 < keep.sum() < mask.sum()


def test_mismatch_kl_is_the_k3_mean():
    old, engine, mask, lengths = _logprobs()
    terms = [math.exp(old[b, t] - engine[b, t]) - 1 - float(old[b, t] - engine[b, t])
             for b, n in enumerate(lengths) for t in range(n)]
    assert mismatch_kl(old, engine, mask) == pytest.approx(sum(terms) / len(terms), rel=1e-6)
    assert mismatch_kl(old, old, mask) == 0.0


def test_correction_needs_old_logprobs_first():
    on = AlgoConfig(train_batch_size=2, ppo_mini_batch_size=2, group_size=4)
    assert is_on_policy(on)
    assert not is_on_policy(AlgoConfig(train_batch_size=2, ppo_mini_batch_size=2, group_size=4,
                                       correction=CorrectionConfig(weights="token")))


def test_bad_choices_name_their_key():
    with pytest.raises(ValueError, match="algo.correction.mask"):
        check_algo(AlgoConfig(correction=CorrectionConfig(mask="tokens")))
    with pytest.raises(ValueError, match="algo.correction.weight_cap"):
        check_algo(AlgoConfig(correction=CorrectionConfig(weights="token", weight_cap=0.5)))


@pytest.mark.parametrize("weights,mask,threshold", [("token", "none", 1.4), ("sequence", "none", 1.4),
                                                    ("none", "token", 1.4), ("none", "sequence", 1.4),
                                                    ("token", "geometric", 1.1)])
def test_update_with_correction_matches_its_loss(weights, mask, threshold):
    # Per token: w * the clipped surrogate, minus beta * k3 (the KL is not reweighted), over the tokens the
    # mask keeps; mean over kept tokens per response, then over responses with a kept token.
    eps, beta, cap = 0.2, 0.1, 1.3
    model, batch = _model(), _batch()
    gen = torch.Generator().manual_seed(3)
    batch.engine_logp = (batch.old_logp + 0.3 * torch.randn(batch.mask.shape, generator=gen)) * batch.mask
    correction = CorrectionConfig(weights=weights, weight_cap=cap, mask=mask, mask_threshold=threshold)
    algo = AlgoConfig(train_batch_size=2, ppo_mini_batch_size=2, group_size=4, token_budget=20,
                      clip_low=eps, clip_high=eps, beta=beta, grad_clip=1e9, correction=correction)
    advantages = batch.advantages.clone()  # [S], before the weights multiply them
    stats = correct_rollouts(batch, correction)
    policy = copy.deepcopy(model)
    got = update_policy(policy, torch.optim.SGD(policy.parameters(), lr=0.0), batch, algo, max_new_tokens=16,
                        temperature=1.0, device="cpu", generator=random.Random(0)).stats
    total, kept_rows, kept_tokens, valid_tokens = 0.0, 0, 0, 0
    for i, prompt in enumerate(batch.prompt_ids):
        n = int(batch.mask[i].sum())
        logp = plain_logprobs(model, prompt, batch.response_ids[i, :n].tolist())
        old, engine, ref = batch.old_logp[i, :n], batch.engine_logp[i, :n], batch.ref_logp[i, :n]
        rho = torch.exp(old - engine)
        w = {"none": torch.ones(n), "token": rho.clamp(max=cap), "sequence": rho.prod().clamp(max=cap).expand(n)}[weights]
        keep = {"none": torch.ones(n, dtype=torch.bool), "token": (rho >= 1 / threshold) & (rho <= threshold),
                "sequence": ((rho.prod() >= 1 / threshold) & (rho.prod() <= threshold)).expand(n),
                "geometric": ((rho.log().mean().exp() >= 1 / threshold)
                              & (rho.log().mean().exp() <= threshold)).expand(n)}[mask]
        ratio = torch.exp(logp - old)
        advantage = float(advantages[i])
        surrogate = torch.minimum(ratio * advantage, ratio.clamp(1 - eps, 1 + eps) * advantage) * w
        k3 = torch.exp(ref - logp) - (ref - logp) - 1
        per_token = -(surrogate - beta * k3)
        valid_tokens += n
        if keep.any():
            total = total + per_token[keep].mean()
            kept_rows += 1
            kept_tokens += int(keep.sum())
    loss = total / kept_rows
    loss.backward()
    assert got["train/loss"] == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
    for (name, want), param in zip(model.named_parameters(), policy.parameters()):
        torch.testing.assert_close(param.grad, want.grad, rtol=1e-4, atol=1e-6, msg=name)
    if mask != "none":
        assert stats["correction/masked_tokens"] == pytest.approx(1 - kept_tokens / valid_tokens)
        assert 0 < stats["correction/masked_tokens"] < 1
    if weights != "none":
        assert 0 < stats["correction/truncated"] < 1

