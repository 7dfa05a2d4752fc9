"""`linear_logprob`: per-position log-probability of the target token and entropy of the output softmax,
without ever holding the [N, V] logits.

    logits = hidden @ weight.T / temperature                     # [N, V], never materialised
    logp[n] = log_softmax(logits[n])[targets[n]]                  # [N]
    entropy[n] = -sum_v p[n, v] log p[n, v]                        # [N]

The kernels walk the vocabulary in chunks of `chunk_size` rows of `weight`: one GEMM per chunk into a
preallocated [N, chunk] buffer, then an online max / sum-exp merge (fp32 accumulation for bf16/fp16,
fp64 for fp64). Backward recomputes each logits chunk and accumulates grad_hidden (fp32) and writes the
chunk's rows of grad_weight: 1 GEMM forward, 3 backward.

Vocabulary parallel (`process_group`): `weight` is this rank's contiguous shard (rank r holds rows
[r*V/P, (r+1)*V/P) of the full output embedding, equal shards), `targets` are global ids. Each rank
computes its shard's (max, sum-exp, entropy partial, target logit); these are all-reduced, so every rank
returns the full-vocabulary logp and entropy. In backward each rank returns the gradient of its own
shard of `weight` and the full gradient of `hidden` (all-reduced over the group): `hidden` is the same
tensor on every rank, as under tensor parallelism after the last all-gather.

`logprob_forward` / `logprob_grads` are the two passes without autograd, for `linear_grpo_loss`.
Every target must be a valid token id (use any valid id at padded positions and mask the loss).
Deliberately left out: ignore-index targets, label smoothing, shards of unequal size.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from r1mega.ops import _extension

# Elements of the [N, chunk] fp32 logits buffer when `chunk_size` is not given (128 MiB on CPU, 256 on CUDA).
_BUFFER_ELEMENTS = {"cpu": 1 << 25, "cuda": 1 << 26}
_MIN_CHUNK = 256


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def default_chunk_size(n: int, v: int, device: torch.device | str) -> int:
    """Vocabulary rows per chunk so that the [N, chunk] logits buffer stays within a fixed budget."""
    budget = _BUFFER_ELEMENTS.get(torch.device(device).type, 1 << 25)
    chunk = max(_MIN_CHUNK, budget // max(n, 1)) // _MIN_CHUNK * _MIN_CHUNK
    return max(1, min(chunk, v))


def _check(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float) -> None:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"linear_logprob: need hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"linear_logprob: hidden is {hidden.dtype} but weight is {weight.dtype}")
    if targets.shape != hidden.shape[:1] or targets.dtype != torch.int64:
        raise ValueError(f"linear_logprob: targets must be int64 [N]={hidden.shape[0]}, got {targets.dtype} "
                         f"{tuple(targets.shape)}")
    if not temperature > 0:
        raise ValueError(f"linear_logprob: temperature must be positive, got {temperature}")


def linear_logprob_reference(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch meaning of `linear_logprob` (one process): materialised logits, log_softmax."""
    acc = _acc_dtype(hidden)
    logits = hidden.to(acc) @ weight.to(acc).T / temperature  # [N, V]
    logprobs = logits.log_softmax(dim=-1)
    logp = logprobs.gather(1, targets[:, None]).squeeze(1)
    entropy = -(logprobs.exp() * logprobs).sum(dim=-1)
    return logp, entropy


# The same algorithm as the kernels, in PyTorch on a materialised shard of logits: what `logprob_forward`
# and `logprob_grads` (the vocabulary-parallel path, linear_grpo_loss) fall back to without a kernel.
def _stats_torch(hidden, weight, targets, temperature, vocab_start):
    acc = _acc_dtype(hidden)
    x = hidden.to(acc) @ weight.to(acc).T / temperature  # [N, Vs]
    m = x.max(dim=-1).values
    rel = x - m[:, None]
    e = rel.exp()
    local = targets - vocab_start
    inside = (local >= 0) & (local < weight.shape[0])
    zt = torch.where(inside, x.gather(1, local.clamp(0, weight.shape[0] - 1)[:, None]).squeeze(1), 0.0)
    return m, e.sum(-1), (e * rel).sum(-1), zt


def _backward_torch(grad_logp, grad_entropy, hidden, weight, targets, lse, entropy, temperature, vocab_start):
    acc = _acc_dtype(hidden)
    h, w = hidden.to(acc), weight.to(acc)
    x = h @ w.T / temperature  # [N, Vs]
    p = (x - lse[:, None]).exp()
    dx = -grad_logp[:, None] * p - grad_entropy[:, None] * p * (x - lse[:, None] + entropy[:, None])
    local = targets - vocab_start
    inside = (local >= 0) & (local < weight.shape[0])
    dx[inside, local[inside]] += grad_logp[inside]
    dz = dx / temperature
    return (dz @ w).to(hidden.dtype), (dz.T @ h).to(weight.dtype)


def _stats(hidden, weight, targets, temperature, vocab_start, chunk_size):
    if _extension.has_kernel("linear_logprob_stats", hidden.device):
        return torch.ops.r1mega.linear_logprob_stats(hidden, weight, targets, temperature, vocab_start, chunk_size)
    return _stats_torch(hidden, weight, targets, temperature, vocab_start)


def _grad_or_zeros(grad, like):
    return torch.zeros_like(like) if grad is None else grad.contiguous()


def _backward(grad_logp, grad_entropy, hidden, weight, targets, lse, entropy, temperature, vocab_start, chunk_size):
    if _extension.has_kernel("linear_logprob_backward", hidden.device):
        return torch.ops.r1mega.linear_logprob_backward(
            grad_logp, grad_entropy, hidden, weight, targets, lse, entropy, temperature, vocab_start, chunk_size)
    return _backward_torch(grad_logp, grad_entropy, hidden, weight, targets, lse, entropy, temperature, vocab_start)


def _rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def logprob_forward(hidden, weight, targets, temperature, chunk_size, group=None):
    """(logp, entropy, lse) [N] over the full vocabulary, no autograd; with `group`, from this rank's shard.

    The shards' partials are relative to each rank's max m_r; rescaled to the global max M they add up:
    S = sum_r s_r a_r, T = sum_r a_r (t_r + s_r (m_r - M)), a_r = exp(m_r - M). Then lse = M + log S,
    logp = z_target - lse and entropy = log S - T / S.
    """
    if group is None and _extension.has_kernel("linear_logprob", hidden.device):
        return torch.ops.r1mega.linear_logprob(hidden, weight, targets, temperature, chunk_size)
    m, s, t, zt = _stats(hidden, weight, targets, temperature, _rank(group) * weight.shape[0], chunk_size)
    big_m = m.clone()
    if group is not None:
        dist.all_reduce(big_m, op=dist.ReduceOp.MAX, group=group)
    a = (m - big_m).exp()
    parts = torch.stack([s * a, a * (t + s * (m - big_m)), zt])  # [3, N]: one all-reduce for the sums
    if group is not None:
        dist.all_reduce(parts, group=group)
    big_s, big_t, zt = parts.unbind(0)
    log_s = big_s.log()
    lse = big_m + log_s
    return zt - lse, log_s - big_t / big_s, lse


def logprob_grads(grad_logp, grad_entropy, hidden, weight, targets, lse, entropy, temperature, chunk_size,
                  group=None):
    """(grad_hidden, grad_weight) for upstream grads of logp and entropy [N]; with `group`, grad_weight is
    this rank's shard and grad_hidden is all-reduced over the group."""
    grad_hidden, grad_weight = _backward(grad_logp, grad_entropy, hidden, weight, targets, lse, entropy,
                                         temperature, _rank(group) * weight.shape[0], chunk_size)
    if group is not None:
        dist.all_reduce(grad_hidden, group=group)
    return grad_hidden, grad_weight


class _VocabParallelLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, group):
        logp, entropy, lse = logprob_forward(hidden, weight, targets, temperature, chunk_size, group)
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.args = (temperature, chunk_size, group)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        grad_hidden, grad_weight = logprob_grads(
            _grad_or_zeros(grad_logp, lse), _grad_or_zeros(grad_entropy, lse), hidden, weight, targets, lse, entropy,
            *ctx.args)
        return grad_hidden, grad_weight, None, None, None, None


if hasattr(torch.ops.r1mega, "linear_logprob"):  # the compiled library defines the schemas

    @torch.library.register_fake("r1mega::linear_logprob_stats")
    def _stats_fake(hidden, weight, targets, temperature, vocab_start, chunk_size):
        n = hidden.shape[0]
        return tuple(hidden.new_empty(n, dtype=_acc_dtype(hidden)) for _ in range(4))

    @torch.library.register_fake("r1mega::linear_logprob")
    def _logprob_fake(hidden, weight, targets, temperature, chunk_size):
        n = hidden.shape[0]
        return tuple(hidden.new_empty(n, dtype=_acc_dtype(hidden)) for _ in range(3))

    @torch.library.register_fake("r1mega::linear_logprob_backward")
    def _backward_fake(grad_logp, grad_entropy, hidden, weight, targets, lse, entropy, temperature, vocab_start,
                       chunk_size):
        return torch.empty_like(hidden), torch.empty_like(weight)

    def _setup_context(ctx, inputs, output):
        hidden, weight, targets, temperature, chunk_size = inputs
        _, entropy, lse = output
        ctx.save_for_backward(hidden, weight, targets, lse, entropy)
        ctx.args = (temperature, chunk_size)

    def _logprob_backward(ctx, grad_logp, grad_entropy, _grad_lse):
        hidden, weight, targets, lse, entropy = ctx.saved_tensors
        temperature, chunk_size = ctx.args
        grad_hidden, grad_weight = torch.ops.r1mega.linear_logprob_backward(
            _grad_or_zeros(grad_logp, lse), _grad_or_zeros(grad_entropy, lse), hidden, weight, targets, lse, entropy,
            temperature, 0, chunk_size)
        return grad_hidden, grad_weight, None, None, None

    torch.library.register_autograd("r1mega::linear_logprob", _logprob_backward, setup_context=_setup_context)


def linear_logprob(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    chunk_size: int | None = None,
    process_group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of `targets` and entropy under softmax(hidden @ weight.T / temperature).

    hidden: [N, H]; weight: [V, H] (this rank's vocabulary shard under `process_group`), same dtype;
    targets: [N] int64 global token ids. Returns (logp [N], entropy [N]) in fp32 (fp64 for fp64 inputs),
    differentiable with respect to hidden and weight.
    """
    _check(hidden, weight, targets, temperature)
    chunk = chunk_size or default_chunk_size(hidden.shape[0], weight.shape[0], hidden.device)
    if process_group is not None:
        return _VocabParallelLogprob.apply(hidden, weight, targets, float(temperature), chunk, process_group)
    if not _extension.has_kernel("linear_logprob", hidden.device):
        return linear_logprob_reference(hidden, weight, targets, temperature=temperature)
    logp, entropy, _ = torch.ops.r1mega.linear_logprob(hidden, weight, targets, float(temperature), chunk)
    return logp, entropy
