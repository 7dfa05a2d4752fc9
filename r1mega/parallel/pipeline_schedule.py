"""The order in which each pipeline rank runs its stages' forwards and backwards, and the executor that
runs one rank's order with point-to-point messages to its neighbours.

Micro-batches here are packed rows of different lengths (the trainer packs by token budget), which
`torch.distributed.pipelining` cannot carry: its stages infer the activation shapes once, from the
first micro-batch. Every pp rank holds the whole batch, so each stage knows every micro-batch's shape
[1, T, H] and its attention layout without being told; only the activations (forward) and their
gradients (backward) travel, each message tagged with its (micro-batch, stage, direction).

Orders (`rank_orders`), for `pp` ranks holding `per_rank` stages each (stage s on rank s % pp):
- forwards in Megatron's order: micro-batches in rounds of `pp`, each round through the rank's stages
  in turn (for one stage per rank: micro-batch order); backwards the same with the stages reversed;
- a rank runs forwards while fewer than `limit` micro-batches wait for their backward, and backwards
  when they are ready: limit pp - r for 1F1B (warm-up pp - r - 1, then one forward one backward), and
  Megatron's interleaved warm-up 2 (pp - r - 1) + (per_rank - 1) pp, plus one, for interleaved 1F1B.
The orders are read off a simulation of all ranks in lock step, in which an action runs only once what
it receives was sent at an earlier tick; so some real interleaving of the ranks runs every action after
its inputs, and since sends never wait (isend) and each receive names its message, no order deadlocks.
Every stage runs its micro-batches' backwards in micro-batch order, as one process accumulates them.

Deliberately left out: zero-bubble schedules (split input and weight gradients), and overlapping a
message with computation beyond what isend gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

Action = tuple[str, int, int]  # ("F" or "B", stage, micro-batch)


def _forward_order(pp: int, per_rank: int, n_micro: int, rank: int, reverse: bool) -> list[tuple[int, int]]:
    chunks = range(per_rank - 1, -1, -1) if reverse else range(per_rank)
    return [(k * pp + rank, m) for start in range(0, n_micro, pp) for k in chunks
            for m in range(start, min(start + pp, n_micro))]


def _limit(pp: int, per_rank: int, rank: int) -> int:
    return pp - rank if per_rank == 1 else 2 * (pp - rank - 1) + (per_rank - 1) * pp + 1


def rank_orders(pp: int, per_rank: int, n_micro: int, backward: bool = True) -> list[list[Action]]:
    """Each pp rank's actions, in the order it runs them (module docstring)."""
    forwards = [_forward_order(pp, per_rank, n_micro, r, reverse=False) for r in range(pp)]
    if not backward:
        return [[("F", s, m) for s, m in order] for order in forwards]
    backwards = [_forward_order(pp, per_rank, n_micro, r, reverse=True) for r in range(pp)]
    last = pp * per_rank - 1
    done: set[Action] = set()
    orders: list[list[Action]] = [[] for _ in range(pp)]
    nf, nb = [0] * pp, [0] * pp
    total = 2 * n_micro * per_rank
    while any(len(o) < total for o in orders):
        ticks, waiting = [], []
        for r in range(pp):
            fwd = forwards[r][nf[r]] if nf[r] < len(forwards[r]) else None
            bwd = backwards[r][nb[r]] if nb[r] < len(backwards[r]) else None
            fwd_ready = fwd is not None and (fwd[0] == 0 or ("F", fwd[0] - 1, fwd[1]) in done)
            bwd_ready = (bwd is not None and ("F", *bwd) in done
                         and (bwd[0] == last or ("B", bwd[0] + 1, bwd[1]) in done))
            if fwd_ready and nf[r] - nb[r] < _limit(pp, per_rank, r):
                ticks.append((r, ("F", *fwd)))
            elif bwd_ready:
                ticks.append((r, ("B", *bwd)))
            elif fwd_ready:
                waiting.append((r, ("F", *fwd)))
        if not ticks:  # not seen with these limits; a forward past its rank's limit keeps the simulation going
            ticks = waiting[:1]
        for r, action in ticks:
            orders[r].append(action)
            if action[0] == "F":
                nf[r] += 1
            else:
                nb[r] += 1
        done.update(action for _, action in ticks)
    return orders


# a micro-batch's head on the last stage: (final-normed hidden [1, T, H], output weight [V, H]) ->
# (the loss to differentiate, or None without backward; what the caller gets back)
Head = Callable[[torch.Tensor, torch.Tensor], tuple[Optional[torch.Tensor], object]]


@dataclass
class Peers:
    """This rank's place in its pipeline: its pp group and the global ranks of its neighbours."""

    group: dist.ProcessGroup
    pp: int
    rank: int  # in the pp group
    prev: int  # global rank holding stage s - 1 of this rank's stage s
    next: int  # global rank holding stage s + 1

    @classmethod
    def of(cls, group: dist.ProcessGroup) -> "Peers":
        pp, rank = dist.get_world_size(group), dist.get_rank(group)
        return cls(group, pp, rank, dist.get_global_rank(group, (rank - 1) % pp),
                   dist.get_global_rank(group, (rank + 1) % pp))


def _tag(m: int, stage: int, n_stages: int, backward: bool) -> int:
    return (m * n_stages + stage) * 2 + int(backward)


def run(stages: dict, n_stages: int, peers: Peers, inputs: list[tuple[torch.Tensor, dict]], heads: list[Head],
        hidden_size: int, dtype: torch.dtype, *, backward: bool, per_rank: int) -> list:
    """Runs this rank's `stages` ({stage index: module(x, input_ids, **kwargs) -> hidden}) over the
    micro-batches `inputs` ((input_ids [1, T], forward kwargs) each) in this rank's order. The last
    stage applies each micro-batch's head to its output and, with `backward`, differentiates the loss
    it returns. Returns the heads' results on the rank holding the last stage, Nones elsewhere."""
    order = rank_orders(peers.pp, per_rank, len(inputs), backward)[peers.rank]
    last = n_stages - 1
    saved: dict[tuple[int, int], tuple] = {}  # (stage, m) -> (input, output or loss) until its backward
    results: list = [None] * len(inputs)
    sends = []
    for kind, s, m in order:
        stage, (input_ids, kwargs) = stages[s], inputs[m]
        shape = (*input_ids.shape, hidden_size)
        if kind == "F":
            if s == 0:
                x = input_ids
            else:
                x = torch.empty(shape, dtype=dtype, device=input_ids.device)
                dist.recv(x, peers.prev, group=peers.group, tag=_tag(m, s - 1, n_stages, False))
                x.requires_grad_(backward)
            with torch.set_grad_enabled(backward):
                out = stage(x, input_ids, **kwargs)
                if s == last:
                    out, results[m] = heads[m](out, stage.output_weight)
            if s != last:
                sends.append(dist.isend(out.detach().contiguous(), peers.next, group=peers.group,
                                        tag=_tag(m, s, n_stages, False)))
            if backward:
                saved[(s, m)] = (x, out)
        else:
            x, out = saved.pop((s, m))
            if s == last:
                torch.autograd.backward(out)
            else:
                grad = torch.empty(shape, dtype=dtype, device=input_ids.device)
                dist.recv(grad, peers.next, group=peers.group, tag=_tag(m, s + 1, n_stages, True))
                torch.autograd.backward(out, grad)
            if s != 0:
                sends.append(dist.isend(x.grad.contiguous(), peers.prev, group=peers.group,
                                        tag=_tag(m, s, n_stages, True)))
    for work in sends:
        work.wait()
    return results
