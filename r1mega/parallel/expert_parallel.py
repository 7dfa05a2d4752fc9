"""Expert parallelism: the routed experts of each MoE layer split over the `ep` mesh, tokens sent to the
rank that owns their expert with `all_to_all_single` and brought back the same way.

`ExpertParallel` is a `ParallelStyle` for the routed-experts module (the one that takes the rows
sorted by expert, `x_sorted` [M, H], and `tokens_per_expert` [E] from `moe_permute`, and returns
`y_sorted` [M, H]). It turns every parameter of that module, whose dim 0 is the expert dimension, into
a DTensor sharded `Shard(0)` over ep, so that FSDP2, distributed checkpoints and weight gathering all
see the global [E, ...] tensors, and it wraps the module's forward:

    dispatch:  counts [E] -> all_to_all -> counts received [P, E/P] (source rank, local expert);
               rows      -> all_to_all (splits = per-rank sums) -> regrouped by local expert
    experts:   the module's own forward on the local rows, local counts and local weights
    combine:   the inverse regrouping, then all_to_all back with the splits swapped

When the ep group includes tensor-parallel ranks (ep spans tp), those ranks hold the same tokens: each
takes a contiguous 1/tp share of the sorted rows before dispatch, and the shares are all-gathered
after combine, so every token is computed once and the expert gradients are not counted tp times.

Deliberately left out: capacity limits and token dropping, overlapping communication with compute,
and splitting one expert over several ranks (expert-tensor parallel).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle


class _AllToAll(torch.autograd.Function):
    """all_to_all_single along dim 0 with uneven splits; its backward is the reverse exchange."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty((sum(ctx.in_splits), *grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return out, None, None, None


def _all_gather_rows(x: torch.Tensor, sizes: list[int], group) -> torch.Tensor:
    """Concatenates every rank's x [sizes[r], ...] along dim 0 (padded to the largest: gloo needs equal sizes)."""
    width = max(sizes)
    padded = torch.cat([x, x.new_zeros((width - x.shape[0], *x.shape[1:]))]) if x.shape[0] < width else x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _SplitRows(torch.autograd.Function):
    """Forward: this rank's share [a, b) of rows every rank holds. Backward: the shares' gradients
    gathered, so the replicated input gets its full gradient on every rank."""

    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.sizes, ctx.group = sizes, group
        start = sum(sizes[:rank])
        return x[start:start + sizes[rank]]

    @staticmethod
    def backward(ctx, grad):
        return _all_gather_rows(grad, ctx.sizes, ctx.group), None, None, None


class _GatherRows(torch.autograd.Function):
    """Forward: the shares gathered into the full rows. Backward: this rank's share of the (replicated)
    gradient; the inverse of _SplitRows."""

    @staticmethod
    def forward(ctx, x, sizes, rank, group):
        ctx.start, ctx.size = sum(sizes[:rank]), sizes[rank]
        return _all_gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.start:ctx.start + ctx.size], None, None, None


def _share_counts(tokens_per_expert: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Per-expert row counts of the rows [start, stop) of an expert-sorted layout."""
    ends = torch.cumsum(tokens_per_expert, 0)
    begins = ends - tokens_per_expert
    return (ends.clamp(max=stop) - begins.clamp(min=start)).clamp(min=0)


def dispatch(x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor, group):
    """x_sorted [M, H] sorted by global expert, counts [E] -> (rows for this rank's experts [M', H]
    grouped by local expert, local counts [E/P], state for `combine`)."""
    world = dist.get_world_size(group)
    counts = tokens_per_expert.to(torch.int64).view(world, -1)  # [P, E/P]: rows for rank p's expert e
    received = torch.empty_like(counts)
    dist.all_to_all_single(received.view(-1), counts.reshape(-1), group=group)  # [P (source), E/P]
    send, recv = counts.sum(1).tolist(), received.sum(1).tolist()
    rows = _AllToAll.apply(x_sorted, recv, send, group)  # [M', H], source-major
    # Regroup source-major blocks (p, e) into expert-major order (e, p): each local expert contiguous.
    n_local = counts.shape[1]
    block = torch.repeat_interleave(torch.arange(received.numel(), device=rows.device), received.view(-1).to(rows.device))
    order = torch.argsort((block % n_local) * world + block // n_local, stable=True)
    return rows[order], received.sum(0), (order, send, recv, group)


def combine(y_local: torch.Tensor, state) -> torch.Tensor:
    """The inverse of `dispatch`: y_local [M', H] in local-expert order -> y_sorted [M, H]."""
    order, send, recv, group = state
    y = y_local[torch.argsort(order)]  # back to source-major
    return _AllToAll.apply(y, send, recv, group)


class _LocalParams:
    """Within the block, the module's DTensor parameters read as their local shards (plain tensors), so
    a model file written for plain tensors runs unchanged; gradients flow back to the DTensors."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self):
        for name, p in self.module.named_parameters(recurse=False):
            if isinstance(p, DTensor):
                self.module.__dict__[name] = p.to_local()  # instance attributes shadow _parameters

    def __exit__(self, *exc):
        for name, _ in self.module.named_parameters(recurse=False):
            self.module.__dict__.pop(name, None)


def _keep_in_graph(y: torch.Tensor, rows: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """y [0, H] made to depend on the (empty) rows and on the module's local parameters, with zero
    gradients. A rank whose experts receive no rows must still take part in the backward: in the
    all_to_all exchanges its peers run (the graph must reach dispatch through combine) and in FSDP's
    gradient reduction of the experts, run when their gradients are ready, in the same order on every
    rank. The model's experts skip an expert without rows, so without this nothing would reach either."""
    params = [getattr(module, name) for name, _ in module.named_parameters(recurse=False)]  # local shards
    return y + rows + 0 * sum(p.sum() for p in params)


class ExpertParallel(ParallelStyle):
    """For a routed-experts module `forward(x_sorted, tokens_per_expert)` whose parameters are stacked
    over experts in dim 0. `tp_mesh`: the tensor-parallel mesh when ep spans tp (replicated tokens)."""

    def __init__(self, tp_mesh: DeviceMesh | None = None):
        super().__init__()
        self.tp_mesh = tp_mesh

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        ep = device_mesh.size()
        for name, p in list(module.named_parameters(recurse=False)):
            if p.shape[0] % ep:
                raise ValueError(f"expert parallel: {name} has {p.shape[0]} experts, not divisible by ep={ep}")
            dt = distribute_tensor(p.detach(), device_mesh, [Shard(0)])
            module.register_parameter(name, nn.Parameter(dt, requires_grad=p.requires_grad))
        ep_group = device_mesh.get_group()
        tp_group = self.tp_mesh.get_group() if self.tp_mesh is not None and self.tp_mesh.size() > 1 else None
        local_forward = module.forward

        def forward(x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if tp_group is not None:
                tp, t = dist.get_world_size(tp_group), dist.get_rank(tp_group)
                sizes = [len(c) for c in torch.arange(x_sorted.shape[0]).tensor_split(tp)]
                start = sum(sizes[:t])
                tokens_per_expert = _share_counts(tokens_per_expert, start, start + sizes[t])
                x_sorted = _SplitRows.apply(x_sorted, sizes, t, tp_group)
            rows, counts, state = dispatch(x_sorted, tokens_per_expert, ep_group)
            with _LocalParams(module):
                y = local_forward(rows, counts, *args, **kwargs)
                if rows.shape[0] == 0:
                    y = _keep_in_graph(y, rows, module)
            y = combine(y, state)
            if tp_group is not None:
                y = _GatherRows.apply(y, sizes, t, tp_group)
            return y

        module.forward = forward
        return module
