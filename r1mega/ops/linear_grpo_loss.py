"""`linear_grpo_loss`: output projection + log-probabilities + GRPO loss, with the gradients of `hidden`
and `weight` computed during the forward, never holding the [B, T, V] logits.

    logp = log_softmax(hidden @ weight.T / temperature)[targets]             # [B, T]
    loss, stats = grpo_loss(logp, old_logp, ref_logp, advantages, mask, ...)  # r1mega/ops/grpo_loss.py

The loss is the last op of the step, so once logp is known its per-token upstream gradient is too:
  1. one chunked pass over the vocabulary: logp, entropy and lse per token (`linear_logprob`'s kernels);
  2. dloss/dlogp [B, T] from `grpo_loss` itself (autograd through its kernel on [B, T] tensors: the
     GRPO formula exists once, in grpo_loss.py);
  3. a second chunked pass (`linear_logprob_backward`) turns it into grad_hidden and grad_weight.
The backward then only scales the saved gradients by the upstream scalar. Cost: 4 GEMMs of 2*N*H*V
flops (logits, recomputed logits, two gradients), against 3 for the materialised path.

Shapes: hidden [B, T, H] with targets, old_logp, ref_logp, mask [B, T] and advantages [B] or [B, T], as
the trainer holds them (any leading shape works as long as hidden.shape[:-1] == targets.shape == the
shape grpo_loss expects). `process_group`: vocabulary parallel as in `linear_logprob` (weight is this
rank's shard, grad_hidden is all-reduced, every rank gets the same loss).

`old_logp=None` is the on-policy case (one optimizer step per rollout batch): the old policy is the
current one, so old_logp is this pass's own logp, detached (ratio exactly 1, no extra forward to get
it). `return_logp=True` also returns that logp [B, T] (detached), e.g. to log the engine-vs-trainer
mismatch without a second forward.

Stats (0-d, no grad): grpo_loss's STATS plus "entropy" (mean over valid tokens).
Deliberately left out: the entropy bonus (entropy is reported, not optimised) and double backward.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from r1mega.ops.grpo_loss import STATS, grpo_loss, grpo_loss_reference
from r1mega.ops.linear_logprob import default_chunk_size, logprob_forward, logprob_grads

STAT_NAMES = STATS + ("entropy",)


def linear_grpo_loss_reference(hidden, weight, targets, old_logp, ref_logp, advantages, mask, *, temperature=1.0,
                               clip_low=0.2, clip_high=0.2, beta=0.001, agg="seq-mean-token-mean", max_len=None,
                               ratio="token"):
    """Plain-PyTorch meaning: materialised logits -> log_softmax -> grpo_loss_reference (autograd)."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = hidden.to(acc) @ weight.to(acc).T / temperature  # [B, T, V]
    logprobs = logits.log_softmax(dim=-1)
    logp = logprobs.gather(-1, targets[..., None]).squeeze(-1)  # [B, T]
    loss, stats = grpo_loss_reference(logp, old_logp, ref_logp, advantages, mask, clip_low=clip_low,
                                      clip_high=clip_high, beta=beta, agg=agg, max_len=max_len, ratio=ratio)
    with torch.no_grad():
        entropy = -(logprobs.exp() * logprobs).sum(dim=-1)
        valid = mask != 0
        stats["entropy"] = torch.where(valid, entropy, 0.0).sum() / valid.sum().clamp(min=1)
    return loss, stats


class _LinearGRPOLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, old_logp, ref_logp, advantages, mask, temperature, grpo_kw,
                chunk_size, group):
        h = hidden.reshape(-1, hidden.shape[-1])  # [N, H]
        t = targets.reshape(-1)  # [N]
        logp, entropy, lse = logprob_forward(h, weight, t, temperature, chunk_size, group)  # [N] each
        logp_bt = logp.view(targets.shape).detach().requires_grad_()
        if old_logp is None:
            old_logp = logp_bt.detach()
        with torch.enable_grad():
            loss, stats = grpo_loss(logp_bt, old_logp, ref_logp, advantages, mask, **grpo_kw)
        valid = mask != 0
        entropy_mean = torch.where(valid, entropy.view(targets.shape), 0.0).sum() / valid.sum().clamp(min=1)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            (grad_logp,) = torch.autograd.grad(loss, logp_bt)  # [B, T] dloss/dlogp
            grad_logp = grad_logp.reshape(-1).to(lse.dtype)
            grad_hidden, grad_weight = logprob_grads(grad_logp, torch.zeros_like(grad_logp), h, weight, t, lse,
                                                     entropy, temperature, chunk_size, group)
            ctx.save_for_backward(grad_hidden.view_as(hidden), grad_weight)
        stats = torch.stack([stats[k].to(entropy_mean.dtype) for k in STATS] + [entropy_mean])
        logp = logp_bt.detach()
        ctx.mark_non_differentiable(stats, logp)
        return loss.detach(), stats, logp

    @staticmethod
    def backward(ctx, grad_loss, _grad_stats, _grad_logp):
        grad_hidden, grad_weight = ctx.saved_tensors
        return (grad_hidden * grad_loss.to(grad_hidden.dtype), grad_weight * grad_loss.to(grad_weight.dtype),
                None, None, None, None, None, None, None, None, None)


def linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float = 1.0,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    beta: float = 0.001,
    agg: str = "seq-mean-token-mean",
    max_len: int | None = None,
    ratio: str = "token",
    chunk_size: int | None = None,
    process_group: dist.ProcessGroup | None = None,
    return_logp: bool = False,
):
    """GRPO loss of the output projection (module docstring).

    hidden: [B, T, H]; weight: [V, H] (this rank's shard under `process_group`); targets: [B, T] int64;
    old_logp (or None: on-policy), ref_logp (or None: no KL), mask: [B, T]; advantages: [B] or [B, T].
    `max_len`, `ratio` as in grpo_loss. Returns (loss: 0-d fp32 (fp64 for fp64 inputs), stats: dict of 0-d
    tensors named in `STAT_NAMES`), and logp [B, T] when `return_logp`.
    """
    if hidden.shape[:-1] != targets.shape or targets.dtype != torch.int64:
        raise ValueError(f"linear_grpo_loss: targets must be int64 of hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}, got {targets.dtype} {tuple(targets.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.dtype != hidden.dtype:
        raise ValueError(f"linear_grpo_loss: weight must be [V, H={hidden.shape[-1]}] of dtype {hidden.dtype}, "
                         f"got {weight.dtype} {tuple(weight.shape)}")
    if not temperature > 0:
        raise ValueError(f"linear_grpo_loss: temperature must be positive, got {temperature}")
    chunk = chunk_size or default_chunk_size(targets.numel(), weight.shape[0], hidden.device)
    grpo_kw = dict(clip_low=clip_low, clip_high=clip_high, beta=beta, agg=agg, max_len=max_len, ratio=ratio)
    loss, stats, logp = _LinearGRPOLoss.apply(hidden, weight, targets, old_logp, ref_logp, advantages, mask,
                                              float(temperature), grpo_kw, chunk, process_group)
    stats = dict(zip(STAT_NAMES, stats.unbind(0)))
    return (loss, stats, logp) if return_logp else (loss, stats)
