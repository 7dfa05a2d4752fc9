"""update_policy's statistics do not depend on how the mini-batch is packed into micro-batches: the
loss is weighted by the aggregation's share, the token means (clip fraction, KL, ratio mean, entropy)
by the share of valid tokens, and the ratio's extremes are taken by min and max. Dr. GRPO's loss
divides by the generation budget, as its paper's formula does."""

import copy
import random

import pytest
import torch

from r1mega.config import AlgoConfig
from r1mega.models.config import ModelConfig
from r1mega.models.transformer import Transformer
from r1mega.ops.group_advantages import group_advantages
from r1mega.trainers.policy_update import update_policy
from r1mega.trainers.rollout_batch import RolloutBatch
from grpo_runs import plain_logprobs

VOCAB = 48


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(architecture="LlamaForCausalLM", vocab_size=VOCAB, hidden_size=16,
                                   intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=2))


def _batch() -> RolloutBatch:
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 9, 3, 7, 9, 2, 6, 8]  # different lengths: sequence and token shares differ
    prompts = [torch.randint(0, VOCAB, (4,), generator=gen).tolist() for _ in lengths]
    ids, mask = RolloutBatch.pad([torch.randint(0, VOCAB, (n,), generator=gen).tolist() for n in lengths])
    rewards = torch.rand(len(lengths), generator=gen)
    # Old and reference logprobs away from the policy's: ratios spread around 1, some clipped, KL > 0.
    old = (-3.9 + 0.3 * torch.randn(mask.shape, generator=gen)) * mask
    ref = (-3.9 + 0.3 * torch.randn(mask.shape, generator=gen)) * mask
    return RolloutBatch(prompts, ids, mask, torch.zeros_like(mask), rewards,
                        advantages=group_advantages(rewards, group_size=4), old_logp=old, ref_logp=ref)


@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"])
def test_statistics_do_not_depend_on_packing(agg):
    model = _model()
    results = []
    for token_budget in (1, 4096):  # one sequence per micro-batch; the whole mini-batch in one
        algo = AlgoConfig(train_batch_size=2, ppo_mini_batch_size=1, group_size=4, token_budget=token_budget, agg=agg,
                          clip_low=0.2, clip_high=0.2, beta=0.1, lr=1e-2)
        policy = copy.deepcopy(model)
        optimizer = torch.optim.AdamW(policy.parameters(), lr=algo.lr)
        stats = update_policy(policy, optimizer, _batch(), algo, max_new_tokens=12, temperature=1.0, device="cpu",
                              generator=random.Random(0)).stats
        results.append((stats, policy.state_dict()))
    (packed, packed_state), (whole, whole_state) = results
    assert 0 < whole["train/clip_fraction"] < 1 and whole["train/kl"] > 0
    assert whole["train/ratio_min"] < 1 < whole["train/ratio_max"]
    assert packed.keys() == whole.keys()
    for key, value in whole.items():
        assert packed[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    for name, tensor in whole_state.items():
        torch.testing.assert_close(packed_state[name], tensor, atol=1e-6, rtol=1e-5, msg=name)


def test_dr_grpo_divides_by_the_generation_budget():
    # Dr. GRPO (Liu et al. 2025, "Understanding R1-Zero-like training"): per token the clipped surrogate
    # minus beta * k3, summed over each response, divided by the generation budget (a constant, not the
    # batch's longest response: 9 tokens here), averaged over responses. Evaluated in plain PyTorch.
    budget, beta, eps = 16, 0.1, 0.2
    model, batch = _model(), _batch()
    algo = AlgoConfig(train_batch_size=2, ppo_mini_batch_size=2, group_size=4, token_budget=4096,
                      agg="seq-mean-token-sum-norm", clip_low=eps, clip_high=eps, beta=beta, grad_clip=1e9)
    policy = copy.deepcopy(model)
    # lr 0: the parameters stay, their .grad holds the step's gradient (grad_clip too large to scale it)
    stats = update_policy(policy, torch.optim.SGD(policy.parameters(), lr=0.0), batch, algo, max_new_tokens=budget,
                          temperature=1.0, device="cpu", generator=random.Random(0)).stats
    total = 0.0
    for i, prompt in enumerate(batch.prompt_ids):
        n = int(batch.mask[i].sum())
        logp = plain_logprobs(model, prompt, batch.response_ids[i, :n].tolist())
        old, ref, advantage = batch.old_logp[i, :n], batch.ref_logp[i, :n], batch.advantages[i]
        ratio = torch.exp(logp - old)
        surrogate = torch.minimum(ratio * advantage, ratio.clamp(1 - eps, 1 + eps) * advantage)
        k3 = torch.exp(ref - logp) - (ref - logp) - 1
        total = total + (-(surrogate - beta * k3)).sum() / budget
    loss = total / len(batch)
    loss.backward()
    # fp32 sums of O(1) terms over a few dozen tokens and a 48-word vocabulary, in another order: ~1e-6
    assert stats["train/loss"] == pytest.approx(loss.item(), rel=1e-5, abs=1e-7)
    for (name, want), got in zip(model.named_parameters(), policy.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-6, msg=name)
