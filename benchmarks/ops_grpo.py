"""Benchmark cases for `grpo_loss` and `group_advantages` (run through `benchmarks/ops.py`).

The baselines are what a user would otherwise run: the peers' eager PyTorch, written here in their
style (not their code), each in the same process as the kernel, and `torch.compile` of the loss
where inductor works (CPU needs a C++ compiler). The plain-PyTorch references of r1mega (heavier: they
guard every overflow) are listed last.

grpo_loss is timed forward + backward (what a training step pays) at 1M tokens, seq-mean-token-mean
(the paper's normalisation), k3 KL with beta 0.001, clip 0.2; the bytes it must move are: read logp,
old_logp, ref_logp, the bool mask and the [B] advantages; write the gradient (the kernel also writes
and reads back its fp32 gradient factor). CUDA adds forward-only rows at 16M tokens; an H100's HBM3
peaks at about 3.35 TB/s. Targets are the issue's; timings on a shared CPU are noisy. `toy`: B=8 T=64
and 64 groups, without the torch.compile baselines (compiling takes longer than the toy run), to check
that the benchmark runs.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from harness import Case

from r1mega.ops.group_advantages import group_advantages, group_advantages_reference
from r1mega.ops.grpo_loss import grpo_loss, grpo_loss_reference

CLIP, BETA = 0.2, 0.001


def trl_grpo_loss(logp, old, ref, adv, mask):
    """Mirrors TRL's GRPOTrainer loss (loss_type "grpo": per-sequence token mean, then the batch mean)
    with the metrics it logs (mean KL, low/high/region clip ratios)."""
    per_token_kl = torch.exp(ref - logp) - (ref - logp) - 1
    coef_1 = torch.exp(logp - old)
    coef_2 = torch.clamp(coef_1, 1 - CLIP, 1 + CLIP)
    per_token_loss = -torch.min(coef_1 * adv.unsqueeze(1), coef_2 * adv.unsqueeze(1)) + BETA * per_token_kl
    loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    with torch.no_grad():
        n = mask.sum()
        low = (coef_1 < 1 - CLIP) & (adv.unsqueeze(1) < 0)
        high = (coef_1 > 1 + CLIP) & (adv.unsqueeze(1) > 0)
        metrics = [(per_token_kl * mask).sum() / n, (low * mask).sum() / n, (high * mask).sum() / n,
                   ((low | high) * mask).sum() / n]
    return loss, metrics


def _masked_mean(x, mask):
    return (x * mask).sum() / (mask.sum() + 1e-8)


def _agg_seq_mean_token_mean(loss_mat, mask):
    return ((loss_mat * mask).sum(-1) / mask.sum(-1)).mean()


def verl_grpo_loss(logp, old, ref, adv_bt, mask):
    """Mirrors verl's actor loss: compute_policy_loss ("vanilla": log-ratio clamped to +-20, dual clip
    at 3, which r1mega's op leaves out) and kl_penalty ("low_var_kl", the k3 estimator clamped), each
    reduced by agg_loss("seq-mean-token-mean"); verl's advantages are per token [B, T]."""
    negative_approx_kl = torch.clamp(logp - old, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -adv_bt * ratio
    pg_losses2 = -adv_bt * torch.clamp(ratio, 1 - CLIP, 1 + CLIP)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_losses3 = -adv_bt * 3.0
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_losses = torch.where(adv_bt < 0, clip_pg_losses2, clip_pg_losses1)
    pg_loss = _agg_seq_mean_token_mean(pg_losses, mask)
    kl = torch.clamp(ref - logp, min=-20, max=20)
    kld = torch.clamp(torch.exp(kl) - kl - 1, min=-10, max=10)
    loss = pg_loss + BETA * _agg_seq_mean_token_mean(kld, mask)
    with torch.no_grad():
        metrics = [_masked_mean(-negative_approx_kl, mask), _masked_mean(torch.gt(pg_losses2, pg_losses1).float(), mask),
                   _masked_mean(torch.gt(clip_pg_losses1, pg_losses3) * (adv_bt < 0).float(), mask)]
    return loss, metrics


def trl_advantages(rewards, group_size):
    """Mirrors TRL's GRPOTrainer advantages: group mean and std by view, repeated back to each sample."""
    mean = rewards.view(-1, group_size).mean(dim=1).repeat_interleave(group_size, dim=0)
    std = rewards.view(-1, group_size).std(dim=1).repeat_interleave(group_size, dim=0)
    return (rewards - mean) / (std + 1e-4)


def verl_advantages(scores, index, epsilon=1e-6):
    """Mirrors verl's compute_grpo_outcome_advantage on per-sample scores [N] (its token-level sum and
    broadcast left out): lists of scores per group id, torch.mean/std per group, a loop over samples."""
    scores = scores.clone()
    id2score, id2mean, id2std = defaultdict(list), {}, {}
    with torch.no_grad():
        for i in range(scores.shape[0]):
            id2score[index[i]].append(scores[i])
        for idx, group in id2score.items():
            if len(group) == 1:
                id2mean[idx], id2std[idx] = torch.tensor(0.0), torch.tensor(1.0)
            else:
                stacked = torch.stack(group)
                id2mean[idx], id2std[idx] = torch.mean(stacked), torch.std(stacked)
        for i in range(scores.shape[0]):
            scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + epsilon)
    return scores


def _compiled(name, make_call, fn):
    """{name: make_call(torch.compile(fn))}, compiled by one call here; {} (with a note) where inductor
    cannot build on this machine."""
    call = make_call(torch.compile(fn, dynamic=False))
    try:
        call()
    except Exception as err:  # no C++ compiler, or an unsupported op: the eager baseline still runs
        print(f"note: {name} skipped ({type(err).__name__}: {str(err).splitlines()[0][:120]})")
        return {}
    return {name: call}


def _grpo_inputs(B, T, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    logp = -torch.rand(B, T, generator=g, device=device) * 4
    old = logp + 0.3 * torch.randn(B, T, generator=g, device=device)
    ref = logp + 0.3 * torch.randn(B, T, generator=g, device=device)
    adv = torch.randn(B, generator=g, device=device)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g, device=device)
    mask = torch.arange(T, device=device)[None, :] < lengths[:, None]  # [B, T] bool, ragged
    return logp.to(dtype).requires_grad_(), old.to(dtype), ref.to(dtype), adv, mask


def _grpo_case(B, T, dtype, device, *, backward=True, target=None, with_compile=True):
    def setup():
        logp, old, ref, adv, mask = _grpo_inputs(B, T, dtype, device)
        adv_bt = adv[:, None] * mask  # verl's token-level advantages

        def step(fn, *args):
            def call():
                logp.grad = None
                loss, _ = fn(logp, old, ref, *args)
                if backward:
                    loss.backward()
            return call if backward else _no_grad(call)

        ours = lambda lp, o, r, a, m: grpo_loss(lp, o, r, a, m, clip_low=CLIP, clip_high=CLIP, beta=BETA)  # noqa: E731
        reference = lambda lp, o, r, a, m: grpo_loss_reference(lp, o, r, a, m, clip_low=CLIP, clip_high=CLIP,  # noqa: E731
                                                               beta=BETA)
        baselines = {"TRL eager": step(trl_grpo_loss, adv, mask), "verl eager": step(verl_grpo_loss, adv_bt, mask)}
        if with_compile:
            baselines.update(_compiled("TRL compiled", lambda fn: step(fn, adv, mask), trl_grpo_loss))
            baselines.update(_compiled("verl compiled", lambda fn: step(fn, adv_bt, mask), verl_grpo_loss))
        baselines["r1mega reference"] = step(reference, adv, mask)
        return baselines, step(ours, adv, mask)

    size = torch.tensor([], dtype=dtype).element_size()
    n = B * T
    moved = n * (3 * size + 1) + B * 4  # read: 3 log-prob tensors, bool mask, [B] advantages
    moved += n * size if backward else n * 4  # write: the gradient (forward only: the fp32 factor)
    shape = f"{'fwd+bwd' if backward else 'fwd'} B={B} T={T} {str(dtype)[6:]}"
    return Case("grpo_loss", shape, setup, device=device, target=target, bytes_moved=moved)


def _no_grad(fn):
    def call():
        with torch.no_grad():
            fn()
    return call


def _advantage_case(n_groups, size, device, *, ids: bool, target=None, with_compile=True):
    def setup():
        g = torch.Generator(device=device).manual_seed(0)
        rewards = (torch.rand(n_groups * size, generator=g, device=device) > 0.5).float()
        if ids:  # unequal, unsorted groups: a random permutation of the fixed-size ones
            group_ids = torch.randperm(n_groups * size, generator=g, device=device) % n_groups
            kw = dict(group_ids=group_ids)
            uids = group_ids.tolist()  # verl keys groups by a per-sample uid array
            baselines = {"verl eager": lambda: verl_advantages(rewards, uids)}
        else:
            kw = dict(group_size=size)
            baselines = {"TRL eager": lambda: trl_advantages(rewards, size)}
            if with_compile:
                baselines.update(_compiled("TRL compiled", lambda fn: lambda: fn(rewards, size), trl_advantages))
        baselines["r1mega reference"] = lambda: group_advantages_reference(rewards, **kw)
        return baselines, (lambda: group_advantages(rewards, **kw))

    shape = f"{n_groups} groups x {size}" + (" (ids)" if ids else "")
    return Case("group_advantages", shape, setup, device=device, target=target,
                bytes_moved=n_groups * size * (4 + 4 + (8 if ids else 0)))


def cases(device: str, toy: bool = False) -> list[Case]:
    if toy:
        return [_grpo_case(8, 64, torch.float32, device, with_compile=False),
                _grpo_case(8, 64, torch.bfloat16, device, backward=False, with_compile=False),
                _advantage_case(64, 8, device, ids=False, with_compile=False),
                _advantage_case(64, 8, device, ids=True, with_compile=False)]
    out = [
        _grpo_case(512, 2048, torch.float32, device, target=">= 5x the eager peer on CPU" if device == "cpu" else None),
        _grpo_case(512, 2048, torch.bfloat16, device),
        _advantage_case(8192, 16, device, ids=False, target=">= 3x the eager peer on CPU" if device == "cpu" else None),
        _advantage_case(8192, 16, device, ids=True),
    ]
    if device == "cuda":
        out += [
            _grpo_case(1024, 16384, torch.float32, device, backward=False, target=">= 70% of the plain copy"),
            _grpo_case(1024, 16384, torch.bfloat16, device, backward=False, target=">= 70% of the plain copy"),
            _grpo_case(1024, 16384, torch.float32, device),
        ]
    return out
