"""megatron backend on one GPU (world of one process, TP=1, no Transformer Engine needed): megatron-core
GPTModels built by r1mega for a tiny DeepSeek-V3 (MLA + shared/routed experts, sigmoid router with
bias, group-limited top-k) and a tiny Qwen2 (GQA with q/k/v biases, tied embeddings) give the native
Transformer's logits and log-probabilities on the same weights (fp32 tightly, bf16 within bf16
rounding), export the same weights back, and one GRPO loss + backward + AdamW step runs with the
loss and gradients of the native model."""

import os
import socket

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

from r1mega.models.config import ModelConfig, tiny_deepseek_v3  # noqa: E402
from r1mega.models.transformer import Transformer  # noqa: E402
from r1mega.ops.linear_grpo_loss import linear_grpo_loss  # noqa: E402

CONFIGS = {
    "deepseek_v3": lambda: tiny_deepseek_v3(vocab_size=256, hidden_size=128, num_hidden_layers=3,
                                            routed_scaling_factor=2.5),
    "qwen2": lambda: ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=256, hidden_size=128,
                                 intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                                 num_key_value_heads=2, attention_bias=True, tie_word_embeddings=True,
                                 rope_theta=1e6),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mb():
    pytest.importorskip("megatron.core", reason="megatron-core is not installed")
    import torch.distributed as dist

    from r1mega.backends import megatron as backend

    torch.cuda.set_device(0)
    own = not dist.is_initialized()
    if own:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group("nccl", rank=0, world_size=1)
    backend.ensure_model_parallel(backend.ParallelConfig())
    yield backend
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if own:
        dist.destroy_process_group()


def native_model(cfg: ModelConfig, dtype: torch.dtype) -> Transformer:
    """Random native model: norms and biases off their constants, router weights large enough that
    top-k choices are not ties under bf16 rounding."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if "norm" in name:
                t.copy_(1 + 0.2 * torch.randn_like(t))
            elif name.endswith("bias"):
                t.copy_(0.1 * torch.randn_like(t))
            elif "router.weight" in name:
                t.normal_(std=0.5)
            elif t.dim() == 2 and t.is_floating_point():
                t.normal_(std=0.05)
    return model.to(device="cuda", dtype=dtype).eval()


def megatron_model(mb, cfg: ModelConfig, native: Transformer, dtype: torch.dtype):
    model = mb.build_model(cfg, dtype=dtype)
    mb.load_native_weights(model, cfg, native.state_dict().items())
    return model.eval()


@pytest.mark.parametrize("arch", sorted(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_logits_match_native(mb, arch, dtype):
    cfg = CONFIGS[arch]()
    native = native_model(cfg, dtype)
    model = megatron_model(mb, cfg, native, dtype)
    ids = torch.randint(0, cfg.vocab_size, (2, 64), device="cuda")
    with torch.no_grad():
        got = model(ids, torch.arange(64, device="cuda").expand(2, 64), None).float()  # [B, T, V]
        want = native(ids)
        reference = native_model(cfg, torch.float32)(ids)  # fp32: how far bf16 rounding alone moves them
    scale = reference.std().item()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=1e-3 * scale, rtol=1e-3)
    else:
        # as close to the fp32 truth as the native model in bf16 is (a mean: a rare top-k flip between
        # near-equal expert scores moves one token, not the average)
        own_error = (want - reference).abs().mean().item()
        assert (got - reference).abs().mean().item() <= 3 * own_error + 1e-3 * scale
    # the weights come back out unchanged (expert bias in fp32)
    back = dict(mb.native_weights(model, cfg))
    for name, t in native.state_dict().items():
        assert torch.equal(back[name].to(t.dtype), t), name


@pytest.mark.parametrize("arch", sorted(CONFIGS))
def test_grpo_step_runs_and_matches_native(mb, arch):
    cfg = CONFIGS[arch]()
    native = native_model(cfg, torch.float32).train()
    model = megatron_model(mb, cfg, native, torch.float32).train()
    b, t = 4, 48
    ids = torch.randint(0, cfg.vocab_size, (b, t), device="cuda")
    targets = torch.roll(ids, -1, dims=1)
    mask = torch.ones(b, t, device="cuda")
    mask[:, :8] = 0  # prompt tokens
    advantages = torch.randn(b, device="cuda")
    with torch.no_grad():
        old_logp, entropy = mb.logprobs(model, ids, targets)
    assert torch.isfinite(old_logp).all() and (old_logp <= 0).all() and (entropy >= 0).all()
    old_logp = old_logp - 0.05 * torch.rand_like(old_logp)  # a policy that moved a little
    ref_logp = old_logp - 0.05

    loss, stats = mb.grpo_loss(model, ids, targets, old_logp, ref_logp, advantages, mask, beta=0.01)
    loss.backward()
    want, _ = linear_grpo_loss(native(ids, return_hidden=True), native.output_weight, targets, old_logp, ref_logp,
                               advantages, mask, beta=0.01)
    want.backward()
    torch.testing.assert_close(loss, want, atol=1e-4, rtol=1e-3)
    assert set(stats) >= {"clip_fraction", "kl", "entropy"}
    def grad(p):  # an expert that received no token may have none
        return p.grad if p.grad is not None else torch.zeros_like(p)

    grads = dict(mb.megatron_to_native(cfg, ((n, grad(p)) for n, p in model.named_parameters()), mb.layout_of(model)))
    for name, p in native.named_parameters():
        torch.testing.assert_close(grads[name], grad(p), atol=1e-4 * grad(p).abs().max().item() + 1e-7, rtol=1e-2,
                                   msg=lambda m, name=name: f"{name}: {m}")

    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    torch.optim.AdamW(model.parameters(), lr=1e-3).step()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if n in before)
    with torch.no_grad():
        new_logp, _ = mb.logprobs(model, ids, targets)
    assert torch.isfinite(new_logp).all() and not torch.equal(new_logp, old_logp)


def test_trainer_with_megatron_backend_matches_native_steps(mb):
    # `model.backend=megatron` end to end on the GPU: three GRPO steps (rollouts from the native engine
    # fed megatron's exported weights) with the same rewards and loss statistics as the native backend.
    from grpo_runs import assert_same_steps, grpo_steps

    native, _ = grpo_steps("model.preset=tiny_deepseek_v3", "model.backend=native", "train.device=cuda")
    megatron, policy_type = grpo_steps("model.preset=tiny_deepseek_v3", "model.backend=megatron", "train.device=cuda")
    assert policy_type.__name__ == "MegatronPolicy"
    assert_same_steps(native, megatron, rel=1e-3)
