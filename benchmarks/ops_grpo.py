"""Benchmark cases for `grpo_loss` and `group_advantages` (run through `benchmarks/ops.py`).

grpo_loss is timed forward + backward (what a training step pays), at 1M tokens on both devices and
at 16M tokens on CUDA, where the forward-only rows also report the achieved memory bandwidth: bytes
the kernel must move (read logp, old_logp, ref_logp, mask and the advantages, write the fp32
per-token gradient factor) over its time; an H100's HBM3 peaks at about 3.35 TB/s.
Targets are the issue's; timings on a shared CPU are noisy.
"""

from __future__ import annotations

import torch
from harness import Case

from r1mega.ops.group_advantages import group_advantages, group_advantages_reference
from r1mega.ops.grpo_loss import grpo_loss, grpo_loss_reference


def _grpo_inputs(B, T, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    logp = -torch.rand(B, T, generator=g, device=device) * 4
    old = logp + 0.3 * torch.randn(B, T, generator=g, device=device)
    ref = logp + 0.3 * torch.randn(B, T, generator=g, device=device)
    adv = torch.randn(B, generator=g, device=device)
    lengths = torch.randint(T // 4, T + 1, (B,), generator=g, device=device)
    mask = torch.arange(T, device=device)[None, :] < lengths[:, None]  # [B, T] bool, ragged
    return logp.to(dtype).requires_grad_(), old.to(dtype), ref.to(dtype), adv, mask


def _grpo_case(B, T, dtype, device, *, backward=True, target=None):
    def setup():
        logp, old, ref, adv, mask = _grpo_inputs(B, T, dtype, device)

        def step(fn):
            def call():
                logp.grad = None
                loss, _ = fn(logp, old, ref, adv, mask, agg="seq-mean-token-mean")
                if backward:
                    loss.backward()
            return call

        if not backward:
            return _no_grad(step(grpo_loss_reference)), _no_grad(step(grpo_loss))
        return step(grpo_loss_reference), step(grpo_loss)

    size = torch.tensor([], dtype=dtype).element_size()
    n = B * T
    moved = n * (3 * size + 1 + 4) + B * 4  # forward: 3 log-prob tensors, bool mask, [B] adv; writes fp32 factor
    if backward:
        moved += n * (4 + size)  # backward reads the factor, writes the gradient
    shape = f"{'fwd+bwd' if backward else 'fwd'} B={B} T={T} {str(dtype)[6:]}"
    return Case("grpo_loss", shape, setup, device=device, target=target, bytes_moved=moved)


def _no_grad(fn):
    def call():
        with torch.no_grad():
            fn()
    return call


def _advantage_case(n_groups, size, device, *, ids: bool, target=None):
    def setup():
        g = torch.Generator(device=device).manual_seed(0)
        rewards = (torch.rand(n_groups * size, generator=g, device=device) > 0.5).float()
        if ids:  # unequal, unsorted groups: a random permutation of the fixed-size ones
            group_ids = torch.randperm(n_groups * size, generator=g, device=device) % n_groups
            kw = dict(group_ids=group_ids)
        else:
            kw = dict(group_size=size)
        return (lambda: group_advantages_reference(rewards, **kw)), (lambda: group_advantages(rewards, **kw))

    shape = f"{n_groups} groups x {size}" + (" (ids)" if ids else "")
    return Case("group_advantages", shape, setup, device=device, target=target,
                bytes_moved=n_groups * size * (4 + 4 + (8 if ids else 0)))


def cases(device: str) -> list[Case]:
    out = [
        _grpo_case(256, 4096, torch.float32, device, target=">= 5x on CPU" if device == "cpu" else None),
        _grpo_case(256, 4096, torch.bfloat16, device),
        _advantage_case(8192, 16, device, ids=False, target=">= 3x on CPU" if device == "cpu" else None),
        _advantage_case(8192, 16, device, ids=True),
    ]
    if device == "cuda":
        out += [
            _grpo_case(1024, 16384, torch.float32, device, backward=False, target=">= 70% of HBM peak"),
            _grpo_case(1024, 16384, torch.bfloat16, device, backward=False, target=">= 70% of HBM peak"),
            _grpo_case(1024, 16384, torch.float32, device),
        ]
    return out
