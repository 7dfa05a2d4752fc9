"""Micro-batches dealt to data-parallel ranks: one process's micro-batches when their count allows, every
rank the same number of them, every sample in exactly one; a sharded batch keeps its rank through
`select`, so mini-batches cut from it deal their own micro-batches."""

import random

import pytest
import torch

from r1mega.data.packing import pack_sequences
from r1mega.trainers.sharded_batch import ShardedRolloutBatch, micro_batches_per_rank


def _check_partition(shares, n):
    assert len({len(share) for share in shares}) == 1, "ranks run different numbers of micro-batches"
    members = sorted(i for share in shares for micro in share for i in micro)
    assert members == list(range(n))
    assert all(micro for share in shares for micro in share)


def test_a_divisible_count_deals_one_process_micro_batches():
    lengths = [9, 3, 7, 5, 2, 8, 4, 6]
    bins = pack_sequences(lengths, 11)  # four micro-batches of 9 + 2, 8 + 3, 7 + 4, 6 + 5
    assert len(bins) == 4
    shares = micro_batches_per_rank(bins, lengths, 2)
    assert shares == [bins[0::2], bins[1::2]]


@pytest.mark.parametrize("ranks", [2, 3, 4])
@pytest.mark.parametrize("budget", [1, 12, 40, 10_000])
def test_every_rank_gets_the_same_number_of_micro_batches(ranks, budget):
    rng = random.Random(budget * 10 + ranks)
    for _ in range(20):
        lengths = [rng.randint(1, 20) for _ in range(ranks * rng.randint(1, 6))]
        shares = micro_batches_per_rank(pack_sequences(lengths, budget), lengths, ranks)
        _check_partition(shares, len(lengths))
        assert all(sum(lengths[i] for i in micro) <= max(budget, max(lengths)) for s in shares for micro in s)


def test_too_few_sequences_is_an_error():
    with pytest.raises(ValueError, match="same number of micro-batches"):
        micro_batches_per_rank([[0], [1], [2]], [1, 1, 1], 2)


def test_sharded_batch_keeps_its_rank_through_select():
    lengths = [3, 1, 4, 1, 5, 2, 6, 2]
    ids, mask = ShardedRolloutBatch.pad([[7] * n for n in lengths])
    shards = [ShardedRolloutBatch([[1, 2]] * 8, ids, mask, torch.zeros_like(mask), torch.zeros(8), dp_rank=r, dp_size=2)
              for r in range(2)]
    minis = [shard.select([6, 0, 3, 5]) for shard in shards]
    assert [(m.dp_rank, m.dp_size) for m in minis] == [(0, 2), (1, 2)]
    _check_partition([m.micro_batches(9) for m in minis], 4)
    _check_partition([s.micro_batches(9) for s in shards], 8)
