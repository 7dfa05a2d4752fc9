"""Packed rows (`segment_ids`): several sequences in one row give the logits and gradients each gets
alone, positions restart per segment, and the packed path builds no [T, T] mask."""

import pytest
import torch
import torch.nn.functional as F

from r1mega.models import Transformer, hf
from r1mega.models.attention import Segments
from r1mega.models.config import tiny_deepseek_v3
from r1mega.models.transformer import segment_positions, segment_spans
from tiny_models import make_hf_dir


@pytest.fixture(scope="module", params=["qwen3", "deepseek_v3"])
def model(request, tmp_path_factory):
    return hf.load(make_hf_dir(request.param, tmp_path_factory.mktemp("m") / request.param))[0]


def test_two_sequences_in_one_row_match_each_alone(model):
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 97, (1, 7), generator=g)
    b = torch.randint(0, 97, (1, 10), generator=g)
    packed = torch.cat([a, b], dim=1)
    segments = torch.tensor([[0] * 7 + [1] * 10])
    with torch.no_grad():
        got = model(packed, Segments(segments))
        torch.testing.assert_close(got[:, :7], model(a), atol=1e-5, rtol=0)
        torch.testing.assert_close(got[:, 7:], model(b), atol=1e-5, rtol=0)


def test_rows_with_different_segmentations_and_grads():
    torch.manual_seed(0)
    model = Transformer(tiny_deepseek_v3(vocab_size=40, num_hidden_layers=2))
    seqs = [torch.randint(0, 40, (n,)) for n in (3, 5, 4, 8)]
    packed = torch.stack([torch.cat(seqs[:3]), torch.cat([seqs[3], seqs[0][:1], seqs[3][:3]])])
    segments = torch.tensor([[0] * 3 + [1] * 5 + [2] * 4, [5] * 8 + [7] + [5] * 3])  # ids may repeat non-adjacently
    logits = model(packed, Segments(segments))
    alone = [model(s[None])[0] for s in seqs[:3]] + [model(seqs[3][None])[0], model(seqs[0][:1][None])[0],
                                                      model(seqs[3][:3][None])[0]]
    torch.testing.assert_close(logits[0], torch.cat(alone[:3]), atol=1e-5, rtol=0)
    torch.testing.assert_close(logits[1], torch.cat(alone[3:]), atol=1e-5, rtol=0)
    # gradients of a packed loss equal the sum of per-sequence gradients
    F.log_softmax(logits, -1)[..., 0].sum().backward()
    packed_grad = model.embed.weight.grad.clone()
    model.zero_grad()
    sum(F.log_softmax(x, -1)[..., 0].sum() for x in
        [model(s[None])[0] for s in seqs[:3]] + [model(seqs[3][None])[0], model(seqs[0][:1][None])[0],
                                                 model(seqs[3][:3][None])[0]]).backward()
    torch.testing.assert_close(packed_grad, model.embed.weight.grad, atol=1e-5, rtol=1e-4)


def test_segment_helpers():
    seg = torch.tensor([[4, 4, 4, 9, 9, 4], [1, 1, 1, 1, 1, 1]])
    assert segment_spans(seg) == [[(0, 3), (3, 5), (5, 6)], [(0, 6)]]
    assert segment_positions(seg).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


def test_packed_path_uses_causal_sdpa_without_mask(monkeypatch):
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((attn_mask, kw.get("is_causal"), q.shape[-2]))
        return real(q, k, v, attn_mask=attn_mask, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model = Transformer(tiny_deepseek_v3(vocab_size=40, num_hidden_layers=1))
    model(torch.zeros(1, 64, dtype=torch.long), Segments(torch.tensor([[0] * 40 + [1] * 24])))
    assert [(m, c, t) for m, c, t in calls] == [(None, True, 40), (None, True, 24)]
    calls.clear()
    model(torch.zeros(2, 64, dtype=torch.long))
    assert calls == [(None, True, 64)]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_packed_bf16_on_gpu_matches_each_alone():
    torch.manual_seed(0)
    model = Transformer(tiny_deepseek_v3(vocab_size=64)).cuda().to(torch.bfloat16)
    a, b = torch.randint(0, 64, (1, 300), device="cuda"), torch.randint(0, 64, (1, 212), device="cuda")
    segments = torch.tensor([[0] * 300 + [1] * 212], device="cuda")
    with torch.no_grad():
        got = model(torch.cat([a, b], dim=1), Segments(segments))
        alone = torch.cat([model(a), model(b)], dim=1)
    torch.testing.assert_close(got, alone, atol=2e-2, rtol=2e-2)
