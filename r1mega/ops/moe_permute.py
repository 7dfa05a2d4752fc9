"""`moe_permute` / `moe_unpermute`: group token rows by expert, and combine the experts' outputs back.

After `moe_route` gives `indices` [N, k], `moe_permute` repeats each token's row once per chosen expert
and sorts the N*k rows by expert id, stably (within an expert, rows keep token order), so each expert
sees one contiguous slice; `tokens_per_expert` [E] are the slice lengths (the split sizes of an
expert-parallel all_to_all). `moe_unpermute` computes y[n] = sum_j weights[n, j] * y_sorted[row of (n, j)].

The row_map convention: `row_map` is [N*k] int64 and
    row_map[n * k + j] = the row of x_sorted holding token n's copy for its j-th expert indices[n, j],
so x_sorted[row_map[n * k + j]] == x[n]. It is a permutation of range(N*k); its inverse
`torch.argsort(row_map)` gives, per sorted row p, the flat pair index n * k + j (token = that // k).
Every kernel reads or writes row n*k+j of this map without atomics: permute scatters, its backward
and unpermute gather.

Deliberately left out: capacity limits and padding per expert (counts are exact), dropped tokens
(every index must be in [0, E)), the all_to_all itself (r1mega/parallel does it with these counts).
"""

from __future__ import annotations

import torch

from r1mega.ops import _extension


def _check_indices(x: torch.Tensor, indices: torch.Tensor, num_experts: int) -> None:
    if x.dim() != 2 or indices.dim() != 2 or indices.shape[0] != x.shape[0]:
        raise ValueError(f"moe_permute: need x [N, H] and indices [N, k], got {tuple(x.shape)} and {tuple(indices.shape)}")
    if num_experts < 1:
        raise ValueError(f"moe_permute: num_experts must be >= 1, got {num_experts}")


def _check_unpermute(y_sorted: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor) -> None:
    if y_sorted.dim() != 2 or weights.dim() != 2 or row_map.shape != (weights.numel(),):
        raise ValueError(
            "moe_unpermute: need y_sorted [N*k, H], row_map [N*k], weights [N, k], got "
            f"{tuple(y_sorted.shape)}, {tuple(row_map.shape)}, {tuple(weights.shape)}"
        )


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def moe_permute_reference(
    x: torch.Tensor, indices: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain-PyTorch meaning of `moe_permute` (autograd through indexing)."""
    _check_indices(x, indices, num_experts)
    top_k = indices.shape[1]
    flat = indices.reshape(-1)  # [N*k] expert of pair n*k+j
    order = torch.sort(flat, stable=True).indices  # [N*k] sorted row p -> pair index
    row_map = torch.empty_like(order)
    row_map[order] = torch.arange(order.numel(), device=order.device)  # pair index -> sorted row
    tokens_per_expert = torch.bincount(flat, minlength=num_experts)  # [E]
    return x[order // top_k], tokens_per_expert, row_map


def moe_unpermute_reference(y_sorted: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Plain-PyTorch meaning of `moe_unpermute`: fp32 (fp64 for fp64 input) accumulation, output in y's dtype."""
    _check_unpermute(y_sorted, row_map, weights)
    n_tokens, top_k = weights.shape
    acc = _acc_dtype(y_sorted.dtype)
    rows = y_sorted[row_map].view(n_tokens, top_k, -1).to(acc)  # [N, k, H]
    return (rows * weights.to(acc).unsqueeze(-1)).sum(dim=1).to(y_sorted.dtype)


if hasattr(torch.ops.r1mega, "moe_permute"):  # the compiled library defines the schemas

    @torch.library.register_fake("r1mega::moe_permute")
    def _permute_fake(x, indices, num_experts):
        n_pairs = indices.numel()
        return (
            x.new_empty(n_pairs, x.shape[1]),
            indices.new_empty(num_experts, dtype=torch.int64),
            indices.new_empty(n_pairs, dtype=torch.int64),
        )

    @torch.library.register_fake("r1mega::moe_permute_backward")
    def _permute_backward_fake(grad_sorted, row_map, top_k):
        return grad_sorted.new_empty(row_map.shape[0] // top_k, grad_sorted.shape[1])

    @torch.library.register_fake("r1mega::moe_unpermute")
    def _unpermute_fake(y_sorted, row_map, weights):
        return y_sorted.new_empty(weights.shape[0], y_sorted.shape[1])

    @torch.library.register_fake("r1mega::moe_unpermute_backward")
    def _unpermute_backward_fake(grad_y, y_sorted, row_map, weights):
        return torch.empty_like(y_sorted), torch.empty_like(weights)

    def _permute_setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[2])
        ctx.top_k = inputs[1].shape[1]

    def _permute_backward(ctx, grad_sorted, _grad_counts, _grad_row_map):
        (row_map,) = ctx.saved_tensors
        return torch.ops.r1mega.moe_permute_backward(grad_sorted, row_map, ctx.top_k), None, None

    def _unpermute_setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    def _unpermute_backward(ctx, grad_y):
        y_sorted, row_map, weights = ctx.saved_tensors
        grad_y_sorted, grad_weights = torch.ops.r1mega.moe_unpermute_backward(grad_y, y_sorted, row_map, weights)
        return grad_y_sorted, None, grad_weights

    torch.library.register_autograd("r1mega::moe_permute", _permute_backward, setup_context=_permute_setup_context)
    torch.library.register_autograd(
        "r1mega::moe_unpermute", _unpermute_backward, setup_context=_unpermute_setup_context
    )


def moe_permute(
    x: torch.Tensor, indices: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [N, H], indices [N, k] int64 -> (x_sorted [N*k, H], tokens_per_expert [E] int64, row_map [N*k] int64).

    Differentiable in x. See the module docstring for the row_map convention.
    """
    _check_indices(x, indices, num_experts)
    if not _extension.has_kernel("moe_permute", x.device):
        return moe_permute_reference(x, indices, num_experts)
    return torch.ops.r1mega.moe_permute(x, indices, num_experts)


def moe_unpermute(y_sorted: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """y_sorted [N*k, H], row_map [N*k] (from moe_permute), weights [N, k] -> y [N, H] in y_sorted's dtype.

    y[n] = sum_j weights[n, j] * y_sorted[row_map[n*k + j]], accumulated in fp32. Differentiable in
    y_sorted and weights.
    """
    _check_unpermute(y_sorted, row_map, weights)
    if not _extension.has_kernel("moe_unpermute", y_sorted.device):
        return moe_unpermute_reference(y_sorted, row_map, weights)
    return torch.ops.r1mega.moe_unpermute(y_sorted, row_map, weights)
