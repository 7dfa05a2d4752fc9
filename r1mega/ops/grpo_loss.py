"""`grpo_loss`: the GRPO policy loss over per-token log-probabilities, with its statistics.

Per valid token t of sequence b (mask != 0), with A the advantage (per sequence or per token):

    ratio    = exp(logp - old_logp)
    surr     = min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A)
    kl       = exp(ref_logp - logp) - (ref_logp - logp) - 1          (k3 estimator, >= 0; 0 without ref)
    l[b, t]  = -(surr - beta * kl)

    loss = "seq-mean-token-mean"     : mean_b ( sum_t l / n_b )           (the paper's formula)
           "token-mean"              : sum_bt l / sum_b n_b
           "seq-mean-token-sum"      : mean_b ( sum_t l )
           "seq-mean-token-sum-norm" : mean_b ( sum_t l / max_len )  (Dr. GRPO: max_len the generation budget, or T)

n_b is the number of valid tokens of row b, and mean_b runs over the rows with n_b > 0: a fully masked
row contributes nothing and is not counted. The loss is 0 when no token is valid. Masked positions may
hold anything (even inf/NaN): they are never read into the loss or the gradient.

The min is written as the equivalent branch on the sign of A (A >= 0: min(ratio, 1 + clip_high) * A,
A < 0: max(ratio, 1 - clip_low) * A). A token is "clipped" when that branch cut the gradient: A > 0 and
ratio > 1 + clip_high, or A < 0 and ratio < 1 - clip_low; at exact equality the gradient still flows.
The maths runs in fp32 (fp64 for fp64 inputs) whatever the input dtype, and nothing is clamped. A ratio
beyond fp32's range (log-ratio > 88.7) is still a finite number, so each term keeps its true value:
- A = 0: the policy term and its gradient are 0, whatever the ratio (not inf * 0 = NaN);
- A > 0: clipped, (1 + clip_high) * A with no gradient;
- A < 0: ratio * A, computed as -exp(log_ratio + ln|A|), so it is -inf only where the product itself
  is beyond fp32 (the loss is then +inf and the trainer skips the step), not wherever the ratio is.
The KL term beta * kl is computed the same way (exactly 0 when beta = 0; beta * exp(x) overflowing only
where the product does). The kernels take the plain products and fall back to that form where a
product is not finite, so both agree with the reference to rounding.

Gradient: only w.r.t. `logp`. The kernel's forward writes dloss/dlogp per token (without the
normalisation) and a per-row scale, so the backward is one elementwise pass.

Micro-batches: the loss is normalised within the tensors given. To split a mini-batch into
micro-batches, multiply each micro-batch's loss by its share of the mini-batch's non-empty rows
(seq-mean-* modes) or of its valid tokens (token-mean), as `r1mega/trainers/policy_update.py` does;
pass the same `max_len` to every micro-batch in "seq-mean-token-sum-norm".

Statistics (0-d tensors, no grad, 0 when no token is valid): clip_fraction (share of valid tokens that
were clipped), kl (mean over valid tokens), ratio_mean, ratio_min, ratio_max.

`ratio="sequence"`: GSPO's sequence-level ratio in place of the token's (r1mega/ops/sequence_ratio.py: the
same kernel, given a stand-in for old_logp); the statistics then describe that ratio.

Deliberately left out: entropy bonus, dual-clip PPO, clamping of the log-ratios (verl's); the fused
version with the output projection is `linear_grpo_loss`.
"""

from __future__ import annotations

import torch

from r1mega.ops import _extension
from r1mega.ops.sequence_ratio import sequence_ratio_old_logp

AGGREGATIONS = ("seq-mean-token-mean", "token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
RATIOS = ("token", "sequence")
STATS = ("clip_fraction", "kl", "ratio_mean", "ratio_min", "ratio_max")


def _check(logp, old_logp, ref_logp, advantages, mask, agg: str, ratio: str) -> None:
    if agg not in AGGREGATIONS:
        raise ValueError(f"grpo_loss: agg must be one of {AGGREGATIONS}, got {agg!r}")
    if ratio not in RATIOS:
        raise ValueError(f"grpo_loss: ratio must be one of {RATIOS}, got {ratio!r}")
    if logp.dim() != 2:
        raise ValueError(f"grpo_loss: logp must be [B, T], got shape {tuple(logp.shape)}")
    for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp), ("mask", mask)):
        if t is not None and t.shape != logp.shape:
            raise ValueError(f"grpo_loss: {name} must have logp's shape {tuple(logp.shape)}, got {tuple(t.shape)}")
    if advantages.shape not in (logp.shape[:1], logp.shape):
        raise ValueError(f"grpo_loss: advantages must be [B] or [B, T] for logp {tuple(logp.shape)}, "
                         f"got {tuple(advantages.shape)}")


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _times_exp(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """c * exp(x) as sign(c) exp(x + ln|c|): it overflows only where the product does, and it is exactly
    0 (with a zero gradient) where c = 0, whatever x."""
    return torch.sign(c) * torch.exp(torch.where(c == 0, 0.0, x) + torch.log(c.abs()))


def grpo_loss_reference(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    beta: float = 0.001,
    agg: str = "seq-mean-token-mean",
    max_len: int | None = None,
    ratio: str = "token",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Plain-PyTorch meaning of `grpo_loss` (autograd through torch ops)."""
    _check(logp, old_logp, ref_logp, advantages, mask, agg, ratio)
    if ratio == "sequence":
        old_logp = sequence_ratio_old_logp(logp, old_logp, mask)
    acc = _acc(logp.dtype)
    valid = mask != 0  # [B, T]
    lp = logp.to(acc)
    adv = advantages.to(acc)
    adv = (adv[:, None] if adv.dim() == 1 else adv).expand_as(lp)  # [B, T]
    log_ratio = torch.where(valid, lp - old_logp.to(acc), 0.0)  # [B, T], 0 at masked tokens
    ratio = torch.exp(log_ratio.detach())
    positive = adv >= 0
    clipped = valid & (adv != 0) & torch.where(positive, ratio > 1 + clip_high, ratio < 1 - clip_low)
    bound = torch.where(positive, 1 + clip_high, 1 - clip_low).to(acc)
    # ratio * A where the gradient flows; the clipped branch carries none, so exp is taken of 0 there
    # and an overflowed ratio cannot turn its zero gradient into 0 * inf = NaN.
    unclipped = _times_exp(adv, torch.where(clipped, 0.0, log_ratio))
    surrogate = torch.where(clipped, bound * adv, unclipped)
    per_token = -surrogate
    kl = torch.zeros_like(lp)
    if ref_logp is not None:
        x = torch.where(valid, ref_logp.to(acc) - lp, 0.0)  # [B, T] log(pi_ref / pi)
        kl = torch.exp(x) - x - 1
        beta_t = torch.tensor(beta, dtype=acc, device=lp.device)
        per_token = per_token + _times_exp(beta_t, x) - beta_t * (x + 1)  # beta * kl
    per_token = torch.where(valid, per_token, 0.0)

    n_row = valid.sum(1).to(acc)  # [B] valid tokens per row
    n_seq = (n_row > 0).sum().to(acc).clamp(min=1)
    n_tok = n_row.sum().clamp(min=1)
    row_sum = per_token.sum(1)  # [B]
    if agg == "seq-mean-token-mean":
        loss = (row_sum / n_row.clamp(min=1)).sum() / n_seq
    elif agg == "token-mean":
        loss = row_sum.sum() / n_tok
    elif agg == "seq-mean-token-sum":
        loss = row_sum.sum() / n_seq
    else:
        loss = row_sum.sum() / (n_seq * (max_len or logp.shape[1]))

    with torch.no_grad():
        any_valid = n_row.sum() > 0
        zero = torch.zeros((), dtype=acc, device=lp.device)
        inf = torch.tensor(float("inf"), dtype=acc, device=lp.device)
        stats = {
            "clip_fraction": clipped.sum().to(acc) / n_tok,
            "kl": torch.where(valid, kl, 0.0).sum() / n_tok,
            "ratio_mean": torch.where(valid, ratio, 0.0).sum() / n_tok,
            "ratio_min": torch.where(any_valid, torch.where(valid, ratio, inf).amin(), zero),
            "ratio_max": torch.where(any_valid, torch.where(valid, ratio, -inf).amax(), zero),
        }
    return loss, {k: v.detach() for k, v in stats.items()}


if hasattr(torch.ops.r1mega, "grpo_loss"):  # the compiled library defines the schemas

    @torch.library.register_fake("r1mega::grpo_loss")
    def _grpo_loss_fake(logp, old_logp, ref_logp, advantages, mask, clip_low, clip_high, beta, agg, max_len):
        acc = _acc(logp.dtype)
        return (logp.new_empty((), dtype=acc), logp.new_empty((len(STATS),), dtype=acc),
                logp.new_empty(logp.shape, dtype=acc), logp.new_empty(logp.shape[:1], dtype=acc))

    @torch.library.register_fake("r1mega::grpo_loss_backward")
    def _grpo_loss_backward_fake(grad_loss, grad_factor, row_scale, dtype):
        return torch.empty_like(grad_factor, dtype=dtype)

    def _grpo_setup_context(ctx, inputs, output):
        _, _, grad_factor, row_scale = output
        ctx.save_for_backward(grad_factor, row_scale)
        ctx.dtype = inputs[0].dtype

    def _grpo_backward(ctx, grad_loss, _grad_stats, _grad_factor, _grad_scale):
        grad_factor, row_scale = ctx.saved_tensors
        grad_logp = torch.ops.r1mega.grpo_loss_backward(grad_loss, grad_factor, row_scale, ctx.dtype)
        return grad_logp, None, None, None, None, None, None, None, None, None

    torch.library.register_autograd("r1mega::grpo_loss", _grpo_backward, setup_context=_grpo_setup_context)


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    beta: float = 0.001,
    agg: str = "seq-mean-token-mean",
    max_len: int | None = None,
    ratio: str = "token",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO loss of the module docstring.

    logp, old_logp, ref_logp (or None: no KL term), mask: [B, T]; advantages: [B] or [B, T].
    Returns (loss: 0-d fp32 (fp64 for fp64 logp), stats: dict of 0-d tensors named in `STATS`).
    """
    _check(logp, old_logp, ref_logp, advantages, mask, agg, ratio)
    if not _extension.has_kernel("grpo_loss", logp.device):
        return grpo_loss_reference(logp, old_logp, ref_logp, advantages, mask, clip_low=clip_low,
                                   clip_high=clip_high, beta=beta, agg=agg, max_len=max_len, ratio=ratio)
    if ratio == "sequence":
        old_logp = sequence_ratio_old_logp(logp, old_logp, mask)
    # One dtype for the three log-prob tensors (the widest), so an fp32 old_logp is never rounded to bf16.
    dtype = torch.promote_types(logp.dtype, old_logp.dtype)
    if ref_logp is not None:
        dtype = torch.promote_types(dtype, ref_logp.dtype)
        ref_logp = ref_logp.to(dtype)
    loss, stats, _, _ = torch.ops.r1mega.grpo_loss(
        logp.to(dtype), old_logp.to(dtype), ref_logp, advantages, mask, float(clip_low), float(clip_high),
        float(beta), agg, int(max_len or logp.shape[1]))
    stats = stats.detach()
    return loss, {name: stats[i] for i, name in enumerate(STATS)}
