"""Gradient-norm clipping for parameters spread over several device meshes, or over none.

`torch.nn.utils.clip_grad_norm_` stacks the norms of all gradients into one tensor, which fails when
tensor parallelism leaves plain tensors beside DTensors (the modules outside its plan, without FSDP)
and when expert parallelism puts the experts on another mesh than the dense parameters. Here the
gradients are grouped by (mesh, placements), plain tensors in a group of their own:

    |g|^2 = sum over groups of |group|^2,   coef = min(1, max_norm / (|g| + 1e-6)),   g <- coef * g

Each group's norm is a DTensor whose `full_tensor()` is the norm over the whole group: DTensor's norm
reduces a Shard placement as a partial sum of squares over that mesh dimension and leaves a Replicate
placement alone, so a replicated gradient counts once, not once per rank (tests/distributed checks
this against the single-process norm for TP, EP, FSDP and their combinations). Plain tensors are
taken to be replicated on every rank that holds them, as tensor parallelism's unplanned modules are
(same inputs, same gradients on every tp rank) and a replicated module's are (replicate.py: DDP sums
them over ranks before they get here), so their norm is this rank's own. Every rank then
holds the same norm and scales by the same coefficient. A non-finite norm is returned as it is (the
gradients become non-finite too, as with torch) for the caller to skip the step.

Every rank must call this with the same parameters having gradients, in the same order: each group's
reduction is a collective. Under pipeline parallelism each stage holds other parameters: `group` (the
pp group) adds the stages' squared norms, and `uncounted` leaves out of the norm a gradient that
another stage counts already (the last stage's copy of tied embeddings, whose gradient equals the
first stage's once they are summed), though it is clipped like the others.
Deliberately left out: norms other than L2.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def _groups(parameters: Iterable[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The parameters that have a gradient, grouped by their gradient's (mesh, placements), plain
    tensors together, in order of first appearance."""
    groups: dict = {}
    for p in parameters:
        if p.grad is not None:
            key = (p.grad.device_mesh, p.grad.placements) if isinstance(p.grad, DTensor) else None
            groups.setdefault(key, []).append(p)
    return list(groups.values())


@torch.no_grad()
def clip_grad_norm(parameters: Iterable[torch.Tensor], max_norm: float, *, uncounted: Iterable[torch.Tensor] = (),
                   group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Scales the gradients of `parameters` so that their global L2 norm is at most `max_norm`;
    returns the norm before scaling (a 0-d fp32 tensor, the same on every rank)."""
    parameters = list(parameters)
    skip = {id(p) for p in uncounted}
    squares = []
    for params in _groups(p for p in parameters if id(p) not in skip):
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares.append(norm.double() ** 2)  # fp64: a norm beyond 1.8e19 still squares finitely
    if not squares and group is None:
        return torch.zeros(())
    if squares:
        total = torch.stack([s.to(squares[0].device) for s in squares]).sum()
    else:  # a stage whose parameters have no gradient still adds its zero to the others'
        total = torch.zeros((), dtype=torch.float64)
    if group is not None:
        dist.all_reduce(total, group=group)
    total = total.sqrt().float()
    for params in _groups(parameters):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total
