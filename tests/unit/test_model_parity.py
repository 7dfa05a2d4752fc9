"""r1mega's Transformer against transformers' own implementation, on tiny random checkpoints of every
supported architecture and its variants (MLA with and without q LoRA, group-limited routing, dense
first layers, tied/untied embeddings, GQA ratios, qkv bias, q/k norm, llama3 and YaRN rope)."""

import pytest
import torch

from r1mega.models import hf
from r1mega.models.balance import expert_load_stats, update_expert_bias
from r1mega.models.moe import MoE
from tiny_models import VARIANTS, load_hf, make_hf_dir


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {v: make_hf_dir(v, root / v, seed=i) for i, v in enumerate(VARIANTS)}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(checkpoints, variant):
    ref = load_hf(checkpoints[variant])
    model, config = hf.load(checkpoints[variant])
    ids = torch.randint(0, config.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    # positions past the YaRN/llama3 original context exercise the scaled frequencies
    pos = torch.arange(13).expand(2, 13) + torch.tensor([[0], [40]])
    with torch.no_grad():
        expected = ref(ids, position_ids=pos).logits
        got = model(ids, position_ids=pos)
        hidden = model(ids, position_ids=pos, return_hidden=True)
    assert got.dtype == torch.float32 and got.shape == (2, 13, config.vocab_size)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert hidden.shape == (2, 13, config.hidden_size)
    torch.testing.assert_close(hidden @ model.output_weight.T, got, atol=1e-5, rtol=0)


def test_moe_layers_record_load_and_balance(checkpoints):
    model, config = hf.load(checkpoints["deepseek_v3"])
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    assert len(moes) == config.num_hidden_layers - config.first_k_dense_replace
    ids = torch.randint(0, config.vocab_size, (3, 10))
    model.train()
    for _ in range(2):
        model(ids)
    for moe in moes:
        assert moe.last_expert_load.shape == (config.n_routed_experts,)
        assert int(moe.last_expert_load.sum()) == 30 * config.num_experts_per_tok
        assert int(moe.load_since_update.sum()) == 2 * 30 * config.num_experts_per_tok
    stats = expert_load_stats(model)
    assert stats["moe/max_over_mean_load"] >= 1.0
    before = [m.router.expert_bias.clone() for m in moes]
    loads = [m.load_since_update.float() for m in moes]
    update_expert_bias(model, rate=0.01)
    for moe, b, load in zip(moes, before, loads):
        expected = b - 0.01 * torch.sign(load - load.mean())
        torch.testing.assert_close(moe.router.expert_bias, expected)
        assert moe.load_since_update is None and moe.router.expert_bias.grad is None


def test_expert_bias_stays_fp32_in_bf16_model(checkpoints):
    model, _ = hf.load(checkpoints["deepseek_v3"])
    model = model.to(torch.bfloat16)
    moe = next(m for m in model.modules() if isinstance(m, MoE))
    assert moe.router.expert_bias.dtype == torch.float32
    assert moe.experts.gate.dtype == torch.bfloat16
    logits = model(torch.randint(0, 97, (1, 5)))
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
