"""Sequence packing: every sequence placed once, the budget kept, positions restarting, and a packed
attention forward equal to the sequences' separate forwards (a plain-PyTorch model in this file)."""

import math
import random

import pytest
import torch

from r1mega.data.packing import gather, pack, pack_sequences, unpack, unpack_batches


def random_sequences(seed, count=40, longest=30):
    rng = random.Random(seed)
    return [[rng.randrange(100) for _ in range(rng.randint(1, longest))] for _ in range(count)]


@pytest.mark.parametrize("seed,budget", [(0, 32), (1, 64), (2, 17), (3, 1000)])
def test_bins_cover_each_sequence_once_within_budget(seed, budget):
    lengths = [len(s) for s in random_sequences(seed)] + [budget + 5, budget * 3]  # two over the budget
    bins = pack_sequences(lengths, budget)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    for b in bins:
        total = sum(lengths[i] for i in b)
        assert total <= budget or len(b) == 1, (b, total)
    over = [b for b in bins if sum(lengths[i] for i in b) > budget]
    assert sorted(i for b in over for i in b) == [i for i, n in enumerate(lengths) if n > budget]
    assert all(len(b) == 1 for b in over)
    # First-fit-decreasing never needs more than 11/9 OPT + 1 bins; OPT >= total / budget.
    fitting = [n for n in lengths if n <= budget]
    assert len(bins) - len(over) <= math.ceil(11 / 9 * math.ceil(sum(fitting) / budget)) + 1


def test_pack_sequences_edge_cases():
    assert pack_sequences([], 8) == []
    assert pack_sequences([8, 8], 8) == [[0], [1]]
    assert pack_sequences([3, 5, 4, 4], 8) == [[1, 0], [2, 3]]  # decreasing order, ties keep input order
    with pytest.raises(ValueError, match="token_budget"):
        pack_sequences([1], 0)


@pytest.mark.parametrize("multiple", [1, 8])
def test_pack_layout_and_round_trip(multiple):
    sequences = random_sequences(5)
    batches = pack(sequences, token_budget=50, pad_id=-7, pad_to_multiple_of=multiple)
    for batch in batches:
        width = batch.input_ids.shape[1]
        assert batch.input_ids.shape == batch.position_ids.shape == batch.segment_ids.shape == (1, width)
        assert width % multiple == 0 and width - sum(batch.lengths) < multiple
        for s, (i, offset, length) in enumerate(zip(batch.index, batch.offsets, batch.lengths)):
            assert batch.input_ids[0, offset:offset + length].tolist() == sequences[i]
            assert batch.position_ids[0, offset:offset + length].tolist() == list(range(length))
            assert (batch.segment_ids[0, offset:offset + length] == s).all()
        padding = batch.segment_ids[0] == -1
        assert int(padding.sum()) == width - sum(batch.lengths)
        assert (batch.input_ids[0, padding] == -7).all() and (batch.position_ids[0, padding] == 0).all()
        assert batch.cu_seqlens.tolist() == [0, *torch.tensor(batch.lengths).cumsum(0).tolist()]
    restored = unpack_batches([b.input_ids for b in batches], batches)
    assert [t.tolist() for t in restored] == sequences


def test_gather_then_unpack_per_token_values():
    sequences = random_sequences(7)
    values = [torch.randn(len(s), 3) for s in sequences]  # e.g. [len, 3] per-token statistics
    batches = pack(sequences, token_budget=64, pad_to_multiple_of=16)
    laid_out = [gather(values, b, pad_value=float("nan")) for b in batches]  # each [1, T, 3]
    for b, row in zip(batches, laid_out):
        assert row.shape == (1, b.input_ids.shape[1], 3)
        assert torch.isnan(row[0, b.segment_ids[0] == -1]).all()
    back = unpack_batches(laid_out, batches)
    for original, restored in zip(values, back):
        torch.testing.assert_close(restored, original)
    with pytest.raises(ValueError, match="positions"):
        unpack(torch.zeros(batches[0].input_ids.shape[1] + 1), batches[0])


class TinyAttention(torch.nn.Module):
    """Token + learned position embedding and one causal attention layer; attention is allowed where
    the query's and key's segments agree, which is what the real model does with segment_ids."""

    def __init__(self):
        super().__init__()
        self.tok, self.pos = torch.nn.Embedding(100, 16), torch.nn.Embedding(64, 16)
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, input_ids, position_ids, segment_ids):  # all [1, T]
        x = self.tok(input_ids) + self.pos(position_ids)  # [1, T, 16]
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        t = input_ids.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool).tril()
        allowed = causal & (segment_ids[0, :, None] == segment_ids[0, None, :])  # [T, T]
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def test_packed_forward_equals_separate_forwards():
    torch.manual_seed(0)
    model = TinyAttention()
    sequences = random_sequences(11, count=12, longest=20)
    batches = pack(sequences, token_budget=48, pad_to_multiple_of=8)
    packed = unpack_batches([model(b.input_ids, b.position_ids, b.segment_ids)[0] for b in batches], batches)
    for seq, out in zip(sequences, packed):
        ids = torch.tensor([seq])
        alone = model(ids, torch.arange(len(seq))[None], torch.zeros_like(ids))[0]
        torch.testing.assert_close(out, alone, atol=1e-5, rtol=1e-5)
