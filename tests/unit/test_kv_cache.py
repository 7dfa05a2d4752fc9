"""The KV-cache path of Transformer.forward: greedy generation equals transformers' `generate`, and
prefill in pieces, rows of different lengths and permuted slots give the no-cache logits."""

import pytest
import torch

from r1mega.models import hf
from r1mega.models.attention import CacheSlots
from r1mega.models.kv_cache import KVCache
from tiny_models import load_hf, make_hf_dir


def greedy(model, prompts: torch.Tensor, new_tokens: int, slots: torch.Tensor) -> torch.Tensor:
    """Prefill the prompts [B, P], then decode one token per step through the cache."""
    b, p = prompts.shape
    cache = KVCache.for_model(model.config, num_slots=4, max_len=p + new_tokens)
    pos = torch.arange(p).expand(b, p)
    logits = model(prompts, CacheSlots(cache, slots), position_ids=pos)
    out = [logits[:, -1].argmax(-1)]
    for step in range(new_tokens - 1):
        pos = torch.full((b, 1), p + step)
        logits = model(out[-1][:, None], CacheSlots(cache, slots), position_ids=pos)
        out.append(logits[:, -1].argmax(-1))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("variant", ["llama", "qwen3_moe", "deepseek_v3"])
def test_greedy_generation_matches_transformers(tmp_path, variant):
    path = make_hf_dir(variant, tmp_path / variant)
    ref = load_hf(path)
    model, config = hf.load(path)
    prompts = torch.randint(0, config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = ref.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False, max_new_tokens=32,
                                min_new_tokens=32, eos_token_id=None, pad_token_id=0)[:, 6:]
        got = greedy(model, prompts, 32, slots=torch.tensor([3, 1]))
    assert torch.equal(got, expected)


def test_cache_prefill_in_pieces_and_ragged_rows(tmp_path):
    model, config = hf.load(make_hf_dir("deepseek_v3_yarn", tmp_path / "m"))
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(config, num_slots=3, max_len=16)
        slots = torch.tensor([2, 0])
        first = model(ids[:, :5], CacheSlots(cache, slots), position_ids=torch.arange(5).expand(2, 5))
        rest = model(ids[:, 5:], CacheSlots(cache, slots), position_ids=torch.arange(5, 12).expand(2, 7))
        torch.testing.assert_close(torch.cat([first, rest], dim=1), full, atol=1e-5, rtol=0)
        # a slot is reused by writing from position 0 again; rows at different lengths in one call
        model(ids[:1, :9], CacheSlots(cache, torch.tensor([1])), position_ids=torch.arange(9)[None])
        step = model(torch.stack([ids[0, 9:10], ids[1, 3:4]]), CacheSlots(cache, torch.tensor([1, 0])),
                     position_ids=torch.tensor([[9], [3]]))
        torch.testing.assert_close(step[0, 0], full[0, 9], atol=1e-5, rtol=0)
        torch.testing.assert_close(step[1, 0], full[1, 3], atol=1e-5, rtol=0)


def test_cache_needs_positions(tmp_path):
    model, config = hf.load(make_hf_dir("llama", tmp_path / "m"))
    cache = KVCache.for_model(config, num_slots=1, max_len=8)
    with pytest.raises(ValueError, match="position_ids"):
        model(torch.zeros(1, 3, dtype=torch.long), CacheSlots(cache, torch.tensor([0])))
