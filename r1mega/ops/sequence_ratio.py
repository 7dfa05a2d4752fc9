"""GSPO's sequence-level importance ratio (Zheng et al. 2025), as the token-level ratio grpo_loss takes.

GSPO replaces the token ratio by the length-normalised sequence ratio, the same for every token of b:

    s_b = (pi(y_b) / pi_old(y_b)) ^ (1 / |y_b|) = exp( mean_t (logp[b, t] - old_logp[b, t]) )

and clips s_b (with small ranges, e.g. 3e-4 / 4e-4). Its token form s_b,t = sg[s_b] * pi(y_t) / sg[pi(y_t)]
has the value s_b and the gradient s_b * grad log pi(y_t), which is grpo_loss's token ratio
exp(logp - old') for the stand-in

    old'[b, t] = sg[logp[b, t]] - sg[log s_b]

so the fused loss computes GSPO with its own kernel: the clip acts on s_b, each token's gradient is the
sequence's. With sequence-mean-token-mean aggregation this is GSPO's objective.
"""

from __future__ import annotations

import torch


def sequence_ratio_old_logp(logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """old' [B, T] of the module docstring (detached; masked positions hold logp, never read)."""
    valid = mask != 0
    logp = logp.detach().to(torch.promote_types(logp.dtype, torch.float32))  # a bf16 stand-in would round log s_b
    log_ratio = torch.where(valid, logp - old_logp.to(logp.dtype), 0.0)
    log_s = log_ratio.sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp(min=1)  # [B, 1]
    return logp - log_s
