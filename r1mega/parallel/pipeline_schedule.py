"""The order in which each pipeline rank runs its stages' forwards and backwards, and the executor that
runs it with point-to-point messages between neighbouring ranks.

Micro-batches here are packed rows of different lengths (the trainer packs by token budget), which
`torch.distributed.pipelining` cannot carry: its stages infer the activation shapes once, from the
first micro-batch. Every pp rank holds the whole batch, so each stage knows every micro-batch's shape
[1, T, H] and its attention layout without being told; only the activations (forward) and their
gradients (backward) travel.

Orders, for `pp` ranks holding `per_rank` stages each (stage s on rank s % pp):
- forwards in Megatron's order: micro-batches in rounds of `pp`, each round through the rank's stages
  in turn (for one stage per rank: micro-batch order); backwards the same with the stages reversed;
- a rank runs forwards while fewer than `limit` of its forwards wait for their backward, and backwards
  when they are ready: limit pp - r for 1F1B (warm-up pp - r - 1 forwards, then one forward one
  backward), Megatron's interleaved warm-up 2 (pp - r - 1) + (per_rank - 1) pp, plus one, for
  interleaved 1F1B.
`schedule_ticks` simulates all ranks in lock step: at each tick every rank takes its next action whose
inputs were produced at an earlier tick. The executor runs the same ticks: a rank does its action of
the tick, then exchanges with its neighbours, in one `batch_isend_irecv`, what the tick's actions
produced (at most one message per rank and tick), each end knowing from the ticks what to send and
receive. Both ends of every link so post the same messages in the same order, which NCCL needs (it
matches point-to-point messages by order, not by tag), and no exchange waits on a later tick, so none
deadlocks. Every stage runs its micro-batches' backwards in micro-batch order, as one process
accumulates them.

Deliberately left out: zero-bubble schedules (split input and weight gradients), and overlapping a
tick's exchange with the next action's computation.
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


def schedule_ticks(pp: int, per_rank: int, n_micro: int, backward: bool = True) -> list[list[Action | None]]:
    """The simulation (module docstring): per tick, each pp rank's action or None."""
    forwards = [_forward_order(pp, per_rank, n_micro, r, reverse=False) for r in range(pp)]
    backwards = [_forward_order(pp, per_rank, n_micro, r, reverse=True) if backward else [] for r in range(pp)]
    last = pp * per_rank - 1
    done: set[Action] = set()
    nf, nb = [0] * pp, [0] * pp
    ticks: list[list[Action | None]] = []
    while any(nf[r] < len(forwards[r]) or nb[r] < len(backwards[r]) for r in range(pp)):
        tick: list[Action | None] = [None] * pp
        waiting = []
        for r in range(pp):
            fwd = forwards[r][nf[r]] if nf[r] < len(forwards[r]) else None
            bwd = backwards[r][nb[r]] if nb[r] < len(backwards[r]) else None
            fwd_ready = fwd is not None and (fwd[0] == 0 or ("F", fwd[0] - 1, fwd[1]) in done)
            bwd_ready = (bwd is not None and ("F", *bwd) in done
                         and (bwd[0] == last or ("B", bwd[0] + 1, bwd[1]) in done))
            if fwd_ready and (not backward or nf[r] - nb[r] < _limit(pp, per_rank, r)):
                tick[r] = ("F", *fwd)
            elif bwd_ready:
                tick[r] = ("B", *bwd)
            elif fwd_ready:
                waiting.append(r)
        if not any(tick):  # not seen with these limits; a forward past its rank's limit keeps the simulation going
            tick[waiting[0]] = ("F", *forwards[waiting[0]][nf[waiting[0]]])
        for r, action in enumerate(tick):
            if action is not None:
                if action[0] == "F":
                    nf[r] += 1
                else:
                    nb[r] += 1
        done.update(action for action in tick if action is not None)
        ticks.append(tick)
    return ticks


def rank_orders(pp: int, per_rank: int, n_micro: int, backward: bool = True) -> list[list[Action]]:
    """Each pp rank's actions, in the order it runs them."""
    ticks = schedule_ticks(pp, per_rank, n_micro, backward)
    return [[tick[r] for tick in ticks if tick[r] is not None] for r in range(pp)]


def most_in_flight(pp: int, per_rank: int, n_micro: int, rank: int) -> int:
    """The most forwards (of one stage and one micro-batch each) pp rank `rank` holds at once waiting for
    their backward: how many micro-batches' activations of a stage its memory must keep."""
    held = most = 0
    for kind, _, _ in rank_orders(pp, per_rank, n_micro)[rank]:
        held += 1 if kind == "F" else -1
        most = max(most, held)
    return most


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
    micro-batches `inputs` ((input_ids [1, T], forward kwargs) each), tick by tick. The last stage
    applies each micro-batch's head to its output and, with `backward`, differentiates the loss it
    returns. Returns the heads' results on the rank holding the last stage, Nones elsewhere."""
    last = n_stages - 1
    saved: dict[tuple[int, int], tuple] = {}  # (stage, m) -> (input, output or loss) until its backward
    received: dict[Action, torch.Tensor] = {}  # what a neighbour's action sent, until this rank's action reads it
    results: list = [None] * len(inputs)

    def shape(m: int) -> tuple[int, ...]:
        return (*inputs[m][0].shape, hidden_size)

    for tick in schedule_ticks(peers.pp, per_rank, len(inputs), backward):
        ops = []
        action = tick[peers.rank]
        if action is not None:
            kind, s, m = action
            stage, (input_ids, kwargs) = stages[s], inputs[m]
            if kind == "F":
                x = input_ids if s == 0 else received.pop(("F", s - 1, m)).requires_grad_(backward)
                with torch.set_grad_enabled(backward):
                    out = stage(x, input_ids, **kwargs)
                    if s == last:
                        out, results[m] = heads[m](out, stage.output_weight)
                if s != last:
                    ops.append(dist.P2POp(dist.isend, out.detach().contiguous(), peers.next, peers.group,
                                          _tag(m, s, n_stages, False)))
                if backward:
                    saved[(s, m)] = (x, out)
            else:
                x, out = saved.pop((s, m))
                if s == last:
                    torch.autograd.backward(out)
                else:
                    torch.autograd.backward(out, received.pop(("B", s + 1, m)))
                if s != 0:
                    ops.append(dist.P2POp(dist.isend, x.grad.contiguous(), peers.prev, peers.group,
                                          _tag(m, s, n_stages, True)))
        # What the neighbours' actions of this tick send here: the previous rank's forward output, the
        # next rank's input gradient (at pp = 2 both neighbours are one rank, doing one or the other).
        incoming = [(a, peers.prev) for a in [tick[(peers.rank - 1) % peers.pp]] if a and a[0] == "F" and a[1] != last]
        incoming += [(a, peers.next) for a in [tick[(peers.rank + 1) % peers.pp]] if a and a[0] == "B" and a[1] != 0]
        for (kind, s, m), source in incoming:
            buffer = torch.empty(shape(m), dtype=dtype, device=inputs[m][0].device)
            received[(kind, s, m)] = buffer
            ops.append(dist.P2POp(dist.irecv, buffer, source, peers.group, _tag(m, s, n_stages, kind == "B")))
        if ops:  # one batch per tick on both ends of every message: the same order on every link (NCCL's rule)
            for work in dist.batch_isend_irecv(ops):
                work.wait()
    return results
