"""r1mega.plan.activations' per-layer formulas against what autograd really keeps: the bytes a block's
forward leaves allocated (its output included) and the peak of its backward, measured with the
profiler's allocator events on CPU, for MLA + MoE (DeepSeek-V3), GQA + qk-norm + MoE (Qwen3-MoE) and
GQA with biases (Qwen2), under each checkpointing mode."""

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from r1mega.models import rope
from r1mega.models.attention import AttnContext
from r1mega.models.config import ModelConfig, tiny_deepseek_v3
from r1mega.models.transformer import Transformer
from r1mega.parallel.checkpointing import apply_activation_checkpointing
from r1mega.plan.activations import layer_activations

TOKENS = 2048  # real budgets are 8k-64k: the per-token terms dominate, as here
CONFIGS = {
    "mla_moe": tiny_deepseek_v3(num_hidden_layers=2),
    "qwen3_moe": ModelConfig(architecture="Qwen3MoeForCausalLM", vocab_size=512, hidden_size=128,
                             intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=32, qk_norm=True, n_routed_experts=8, num_experts_per_tok=2,
                             moe_intermediate_size=64, scoring_func="softmax", mlp_only_layers=[0]),
    "qwen2": ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=512, hidden_size=128, intermediate_size=320,
                         num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, attention_bias=True,
                         tie_word_embeddings=True),
}


def allocated_during(fn):
    """(bytes still allocated at the end, peak bytes allocated) of what `fn` allocates, and its result."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    now = peak = 0
    for _, nbytes in events:
        now += nbytes
        peak = max(peak, now)
    return now, peak, result


@pytest.mark.parametrize("mode", ["none", "selective", "full"])
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_layer_formulas_match_autograd(kind, mode):
    torch.manual_seed(0)
    config = CONFIGS[kind]
    model = Transformer(config)
    apply_activation_checkpointing(model, mode)
    cos, sin = rope.cos_sin(config, torch.arange(TOKENS)[None], torch.float32)
    ctx = AttnContext(cos=cos, sin=sin)
    for i, block in enumerate(model.layers):
        x = torch.randn(1, TOKENS, config.hidden_size, requires_grad=True)
        block(x, ctx).sum().backward()  # parameter gradients exist before the measured backward
        x.grad = None
        kept, _, y = allocated_during(lambda: block(x, ctx))
        grad = torch.randn_like(y)
        _, transient, _ = allocated_during(lambda: y.backward(grad))
        formula = layer_activations(config, i, mode)
        assert kept == pytest.approx(formula.kept * TOKENS, rel=0.02), f"layer {i} kept"
        assert transient == pytest.approx(formula.transient * TOKENS, rel=0.10), f"layer {i} backward"
