"""Vocabulary-parallel linear_logprob and linear_grpo_loss on 2 gloo processes: each rank holds half of the
output embedding; logp, entropy, the loss, grad_hidden and each rank's shard of grad_weight must equal
the single-process materialised reference."""

import pytest
import torch
import torch.distributed as dist

from helpers import run_world
from r1mega.ops.linear_grpo_loss import linear_grpo_loss, linear_grpo_loss_reference
from r1mega.ops.linear_logprob import linear_logprob, linear_logprob_reference

pytestmark = pytest.mark.distributed
N, H, V = 13, 8, 58  # V / 2 = 29 rows per rank, chunked by 8 (uneven last chunk)


def _inputs(dtype):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=gen, dtype=dtype)
    weight = torch.randn(V, H, generator=gen, dtype=dtype)
    targets = torch.randint(0, V, (N,), generator=gen)
    upstream = torch.randn(2, N, generator=gen, dtype=dtype)
    return hidden, weight, targets, upstream


def _grads(fn, hidden, weight, *args, **kw):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = fn(h, w, *args, **kw)
    return out, h, w


def _logprob_worker(rank, world, dtype, tol):
    hidden, weight, targets, (g_logp, g_ent) = _inputs(dtype)
    shard = V // world
    (logp_r, ent_r), h_r, w_r = _grads(linear_logprob_reference, hidden, weight, targets, temperature=0.9)
    (logp_r * g_logp + ent_r * g_ent).sum().backward()
    (logp, ent), h, w = _grads(linear_logprob, hidden, weight[rank * shard:(rank + 1) * shard], targets,
                               temperature=0.9, chunk_size=8, process_group=dist.group.WORLD)
    (logp * g_logp + ent * g_ent).sum().backward()
    torch.testing.assert_close(logp, logp_r, atol=tol, rtol=tol)
    torch.testing.assert_close(ent, ent_r, atol=tol, rtol=tol)
    torch.testing.assert_close(h.grad, h_r.grad, atol=tol, rtol=tol)
    torch.testing.assert_close(w.grad, w_r.grad[rank * shard:(rank + 1) * shard], atol=tol, rtol=tol)


def _grpo_worker(rank, world):
    hidden, weight, targets, (noise, adv) = _inputs(torch.float64)
    shard = V // world
    b, t = 1, N  # one sequence of N tokens
    logp0 = linear_logprob_reference(hidden, weight, targets)[0]
    batch = (targets.view(b, t), (logp0 + 0.3 * noise).view(b, t), (logp0 - 0.3 * noise).view(b, t), adv[:1],
             torch.arange(N).view(b, t) % 4 != 0)
    kw = dict(clip_low=0.2, clip_high=0.28, beta=0.01)
    (loss_r, stats_r), h_r, w_r = _grads(linear_grpo_loss_reference, hidden.view(b, t, H), weight, *batch, **kw)
    loss_r.backward()
    (loss, stats), h, w = _grads(linear_grpo_loss, hidden.view(b, t, H), weight[rank * shard:(rank + 1) * shard],
                                 *batch, chunk_size=8, process_group=dist.group.WORLD, **kw)
    loss.backward()
    torch.testing.assert_close(loss, loss_r)
    for name, value in stats_r.items():
        torch.testing.assert_close(stats[name], value, msg=name)
    torch.testing.assert_close(h.grad, h_r.grad)
    torch.testing.assert_close(w.grad, w_r.grad[rank * shard:(rank + 1) * shard])


def _worker(rank, world):
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-5)):
        _logprob_worker(rank, world, dtype, tol)
    _grpo_worker(rank, world)


def test_vocab_parallel_matches_single_process():
    """One spawn for all checks: starting the processes is most of the time."""
    run_world(_worker, 2)
