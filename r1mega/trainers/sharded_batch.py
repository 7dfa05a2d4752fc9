"""The rollout batch split over data-parallel ranks by micro-batches.

Every rank holds the whole (gathered) rollout batch, shuffles it and cuts it into mini-batches in step
with the others, and normalises each micro-batch's loss by its share of the global mini-batch
(policy_update.py); what differs between ranks is only which micro-batches each one runs.
`micro_batches_per_rank` takes the micro-batches one process would pack (TokenBatch.micro_batches) and deals them round-robin,
so when their count is a multiple of the data-parallel degree each rank runs micro-batches of the
single-process run exactly,
and every statistic weighted by micro-batch shares equals that run's. When it is not, the fullest
micro-batch (by tokens, among those of two or more sequences) is halved until it is: every rank must
run the same number of forward and backward passes, since FSDP's gathers and gradient reductions are
collectives. That is always possible when the data-parallel degree divides the number of sequences.

The batch knows its ranks, so what is computed on it comes back global: `all_reduce` sums the per-token
logprobs each rank filled in for its own rows (zeros elsewhere) and the share-weighted statistics, and
min- or max-reduces their extremes, over the data-parallel group, on its communication device.

Deliberately left out: balancing tokens across ranks beyond round-robin over first-fit-decreasing bins.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from r1mega.trainers.rollout_batch import RolloutBatch


def micro_batches_per_rank(bins: list[list[int]], lengths: list[int], ranks: int) -> list[list[list[int]]]:
    """`bins` (micro-batches of sequence indices) dealt to `ranks` ranks, the same number each."""
    bins = [list(b) for b in bins]
    while len(bins) % ranks:
        splittable = [i for i, b in enumerate(bins) if len(b) > 1]
        if not splittable:
            raise ValueError(f"{len(lengths)} sequences cannot run as the same number of micro-batches on "
                             f"{ranks} data-parallel ranks")
        i = max(splittable, key=lambda i: sum(lengths[j] for j in bins[i]))
        bins[i:i + 1] = [bins[i][0::2], bins[i][1::2]]  # alternate members: a bin is packed longest first
    return [bins[r::ranks] for r in range(ranks)]


_OPS = {"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}


@dataclass
class ShardedRolloutBatch(RolloutBatch):
    """The whole rollout batch as data-parallel rank `dp_rank` of `dp_size` (in process group `group`,
    communicating on `comm_device`) sees it: selecting samples works as on any batch, `micro_batches`
    returns this rank's share (`micro_batches_per_rank`), `all_reduce` reduces over the group."""

    dp_rank: int = 0
    dp_size: int = 1
    group: dist.ProcessGroup | None = None
    comm_device: torch.device | None = None

    def micro_batches(self, token_budget: int) -> list[list[int]]:
        return micro_batches_per_rank(super().micro_batches(token_budget), self.lengths(), self.dp_size)[self.dp_rank]

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        out = tensor.to(self.comm_device)
        dist.all_reduce(out, op=_OPS[op], group=self.group)
        return out.to(tensor.device)
