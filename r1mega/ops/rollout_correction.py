"""Rollout correction: the engine's samples reweighted or dropped where the trainer's probabilities of the
same tokens disagree with the engine's (bf16, other kernels, other MoE routing, stale weights).

With rho[b, t] = pi_old(y_t) / pi_engine(y_t) = exp(old_logp - engine_logp) on valid tokens:

    importance weights (TIS, truncated importance sampling; Yao et al. 2025), multiplying the policy term:
        "token":    w[b, t] = min(rho[b, t], C)
        "sequence": w[b, t] = min(prod_t' rho[b, t'], C)                  (the same for every token of b)
    rejection masks (masked IS: verl's rollout_rs token_k1 / seq_sum_k1 / seq_mean_k1, IcePop's token mask),
    keep[b, t] = 1 when the chosen ratio lies in [1/C, C], else the token leaves the loss:
        "token":     rho[b, t]
        "sequence":  prod_t' rho[b, t']                                   (whole sequences dropped)
        "geometric": exp(mean_t' log rho[b, t'])                          (whole sequences, length-neutral)

    mismatch KL = mean over valid tokens of  rho - 1 - log rho   (k3: an unbiased, non-negative estimate of
                  KL(pi_engine || pi_old) per token, since the tokens were sampled from pi_engine)

Products are taken as sums of log-ratios, so they never overflow. The weights are constants (no
gradient): they change the measure the gradient is estimated under, not the objective. A mask drops
tokens from the loss's normalisation as well (the trainer hands it to the loss as its mask), while a
weight keeps every token counted.

Deliberately left out: batch-normalised weights, IcePop's zeroed-but-counted tokens, k2/k3 rejection
statistics (verl's other rollout_rs options).
"""

from __future__ import annotations

import torch

WEIGHT_LEVELS = ("none", "token", "sequence")
MASK_LEVELS = ("none", "token", "sequence", "geometric")


def _log_ratio(old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log rho [B, T] in fp64, 0 at masked tokens."""
    return torch.where(mask != 0, old_logp.double() - engine_logp.double(), 0.0)


def importance_weights(old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor, *, level: str,
                       cap: float) -> torch.Tensor:
    """w [B, T] of the module docstring (float32, 0 at masked tokens); level "token" or "sequence"."""
    log_rho = _log_ratio(old_logp, engine_logp, mask)
    if level == "sequence":
        log_rho = log_rho.sum(1, keepdim=True).expand_as(log_rho)
    elif level != "token":
        raise ValueError(f"importance_weights: level must be 'token' or 'sequence', got {level!r}")
    return torch.where(mask != 0, log_rho.clamp(max=torch.log(torch.tensor(cap, dtype=torch.float64))).exp(),
                       0.0).float()


def rejection_mask(old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor, *, level: str,
                   threshold: float) -> torch.Tensor:
    """mask [B, T] with the rejected tokens (or sequences) set to 0 (module docstring)."""
    log_rho = _log_ratio(old_logp, engine_logp, mask)
    if level == "sequence":
        log_rho = log_rho.sum(1, keepdim=True)
    elif level == "geometric":
        log_rho = log_rho.sum(1, keepdim=True) / (mask != 0).sum(1, keepdim=True).clamp(min=1)
    elif level != "token":
        raise ValueError(f"rejection_mask: level must be 'token', 'sequence' or 'geometric', got {level!r}")
    bound = abs(float(torch.log(torch.tensor(threshold, dtype=torch.float64))))
    return mask * (log_rho.abs() <= bound).to(mask.dtype)


def mismatch_kl(old_logp: torch.Tensor, engine_logp: torch.Tensor, mask: torch.Tensor) -> float:
    """The k3 estimate of KL(pi_engine || pi_old) per valid token (module docstring)."""
    log_rho = _log_ratio(old_logp, engine_logp, mask)
    k3 = torch.where(mask != 0, log_rho.exp() - 1 - log_rho, 0.0)
    return float(k3.sum() / (mask != 0).sum().clamp(min=1))
