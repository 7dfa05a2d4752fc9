"""moe_route / moe_permute / moe_unpermute: compiled kernels against the plain-PyTorch references and
transformers' DeepSeek-V3 and Qwen3-MoE routers, forward and backward, plus the documented tie rules."""

import pytest
import torch

from r1mega.ops.moe import (
    moe_permute,
    moe_permute_reference,
    moe_route,
    moe_route_reference,
    moe_unpermute,
    moe_unpermute_reference,
)
from op_devices import DEVICES, needs_kernel

ROUTE_CONFIGS = [  # (E, top_k, n_group, topk_group)
    (16, 4, 1, 1),
    (64, 6, 8, 4),
    (12, 3, 4, 1),  # one group kept: all k experts come from it
    (32, 8, 8, 8),
]


def route_both(logits, bias, **kw):
    """(kernel, reference) weights and indices, and the logits gradients for the same upstream grad."""
    leaf = logits.detach().requires_grad_()
    ref_leaf = logits.detach().requires_grad_()
    w, i = moe_route(leaf, bias, **kw)
    wr, ir = moe_route_reference(ref_leaf, bias, **kw)
    g = torch.randn_like(wr)
    (grad,) = torch.autograd.grad(w, leaf, g)
    (grad_ref,) = torch.autograd.grad(wr, ref_leaf, g)
    return (w, i, grad), (wr, ir, grad_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("score", ["sigmoid", "softmax"])
@pytest.mark.parametrize("config", ROUTE_CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_route_matches_reference(device, score, config, dtype, with_bias):
    needs_kernel("moe_route", device)
    n_experts, top_k, n_group, topk_group = config
    gen = torch.Generator().manual_seed(n_experts + top_k)
    logits = torch.randn(67, n_experts, generator=gen).to(device, dtype)
    bias = (0.1 * torch.randn(n_experts, generator=gen)).to(device) if with_bias else None
    kw = dict(top_k=top_k, n_group=n_group, topk_group=topk_group, scaling=2.5, score=score)
    (w, i, grad), (wr, ir, grad_ref) = route_both(logits, bias, **kw)
    # The scores come from the same ATen kernels in both, so the selection is exact even for bf16 logits.
    assert torch.equal(i, ir)
    assert w.dtype == torch.float32 and grad.dtype == dtype
    torch.testing.assert_close(w, wr, rtol=1e-6, atol=1e-6)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-3)
    torch.testing.assert_close(grad, grad_ref, **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("norm_topk", [True, False])
def test_route_edge_shapes(device, norm_topk):
    needs_kernel("moe_route", device)
    gen = torch.Generator().manual_seed(1)
    for n_tokens, n_experts, top_k in [(1, 8, 2), (1, 8, 8), (37, 10, 10), (129, 5, 1)]:
        logits = torch.randn(n_tokens, n_experts, generator=gen).to(device)
        for score in ["sigmoid", "softmax"]:
            kw = dict(top_k=top_k, score=score, norm_topk=norm_topk, scaling=1.5)
            (w, i, grad), (wr, ir, grad_ref) = route_both(logits, None, **kw)
            assert torch.equal(i, ir)
            torch.testing.assert_close(w, wr, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-6)
            if top_k == n_experts:  # every expert, each once
                assert torch.equal(i.sort(dim=-1).values, torch.arange(n_experts, device=device).expand_as(i))


@pytest.mark.parametrize("device", DEVICES)
def test_route_ties_resolve_to_the_lower_index(device):
    needs_kernel("moe_route", device)
    for route in (moe_route, moe_route_reference):
        # All equal: experts 0..k-1; with groups, the first topk_group groups are kept.
        w, i = route(torch.zeros(3, 8, device=device), None, top_k=3)
        assert i.tolist() == [[0, 1, 2]] * 3
        torch.testing.assert_close(w, torch.full((3, 3), 1 / 3, device=device))
        _, i = route(torch.zeros(2, 8, device=device), None, top_k=3, n_group=4, topk_group=2)
        assert i.tolist() == [[0, 1, 2]] * 2
        # Ties among the best: listed by descending score, equal scores by ascending index.
        logits = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 2.0]], device=device)
        _, i = route(logits, None, top_k=5, score="softmax")
        assert i.tolist() == [[1, 2, 4, 3, 5]]
        # Group ties: groups {0,1} and {2,3} hold the same scores, so their top-2 sums are equal; the
        # lower group wins (group 1 would give [3, 2], no group limit [0, 3]).
        logits = torch.tensor([[2.0, 1.0, 1.0, 2.0, 0.0, 0.0]], device=device)
        _, i = route(logits, None, top_k=2, n_group=3, topk_group=1, score="softmax")
        assert i.tolist() == [[0, 1]]


@pytest.mark.parametrize("device", DEVICES)
def test_route_huge_logits(device):
    needs_kernel("moe_route", device)
    gen = torch.Generator().manual_seed(2)
    # Saturated sigmoids tie at exactly 1 or 0; softmax keeps working with +-1e4 logits.
    logits = (1e4 * torch.randn(41, 32, generator=gen)).to(device)
    for score in ["sigmoid", "softmax"]:
        kw = dict(top_k=4, n_group=4, topk_group=2, scaling=2.5, score=score)
        (w, i, grad), (wr, ir, grad_ref) = route_both(logits, None, **kw)
        assert torch.equal(i, ir) and torch.isfinite(w).all() and torch.isfinite(grad).all()
        torch.testing.assert_close(w, wr)
        torch.testing.assert_close(grad, grad_ref)


def _by_index(weights, indices):
    order = indices.sort(dim=-1).indices
    return indices.gather(1, order), weights.gather(1, order)


@pytest.mark.parametrize("config", [(64, 6, 8, 4), (16, 4, 1, 1), (32, 3, 4, 3)])
def test_route_equals_transformers_deepseek_v3(config):
    from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    n_experts, top_k, n_group, topk_group = config
    cfg = DeepseekV3Config(
        hidden_size=24, n_routed_experts=n_experts, num_experts_per_tok=top_k, n_group=n_group,
        topk_group=topk_group, routed_scaling_factor=2.5, norm_topk_prob=True,
    )
    torch.manual_seed(0)
    router = DeepseekV3TopkRouter(cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    router.e_score_correction_bias.normal_(std=0.2)
    logits, w_hf, i_hf = router(torch.randn(53, 24))
    w, i = moe_route(
        logits, router.e_score_correction_bias, top_k=top_k, n_group=n_group, topk_group=topk_group, scaling=2.5
    )
    i_hf, w_hf = _by_index(w_hf, i_hf)  # transformers' top-k is unsorted: compare as sets
    i, w = _by_index(w, i)
    assert torch.equal(i, i_hf)
    torch.testing.assert_close(w, w_hf, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("norm_topk", [True, False])
def test_route_equals_transformers_qwen3_moe(norm_topk):
    from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    cfg = Qwen3MoeConfig(hidden_size=24, num_experts=16, num_experts_per_tok=4, norm_topk_prob=norm_topk)
    torch.manual_seed(0)
    router = Qwen3MoeTopKRouter(cfg)
    torch.nn.init.normal_(router.weight, std=0.5)
    logits, w_hf, i_hf = router(torch.randn(53, 24))
    w, i = moe_route(logits, None, top_k=4, score="softmax", norm_topk=norm_topk)
    assert torch.equal(i, i_hf)  # both sorted by descending probability
    torch.testing.assert_close(w, w_hf, rtol=1e-6, atol=1e-6)


def test_route_rejects_bad_configs():
    logits = torch.randn(4, 8)
    with pytest.raises(ValueError, match="top_k"):
        moe_route(logits, None, top_k=5, n_group=4, topk_group=2)  # only 4 experts in the kept groups
    with pytest.raises(ValueError, match="n_group"):
        moe_route(logits, None, top_k=2, n_group=3)
    with pytest.raises(ValueError, match="score"):
        moe_route(logits, None, top_k=2, score="relu")


def _routing(n_tokens, n_experts, top_k, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    indices = torch.rand(n_tokens, n_experts, generator=gen).argsort(dim=-1)[:, :top_k]
    return indices.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 4, 1, 3), (37, 8, 3, 33), (300, 64, 6, 16), (5, 3, 3, 7)])
def test_permute_matches_reference(device, dtype, shape):
    needs_kernel("moe_permute", device)
    n_tokens, n_experts, top_k, hidden = shape
    indices = _routing(n_tokens, n_experts, top_k, device)
    x = torch.randn(n_tokens, hidden, device=device, dtype=dtype, requires_grad=True)
    xs, counts, row_map = moe_permute(x, indices, n_experts)
    xs_ref, counts_ref, row_map_ref = moe_permute_reference(x, indices, n_experts)
    assert torch.equal(xs, xs_ref) and torch.equal(counts, counts_ref) and torch.equal(row_map, row_map_ref)
    # The documented convention: x_sorted[row_map[n*k + j]] is token n, rows grouped by expert, stable.
    assert torch.equal(xs[row_map].view(n_tokens, top_k, hidden), x.detach()[:, None].expand(-1, top_k, -1))
    expert_of_row = torch.repeat_interleave(torch.arange(n_experts, device=device), counts)
    assert torch.equal(expert_of_row[row_map], indices.reshape(-1))
    token_of_row = torch.argsort(row_map) // top_k
    assert all((t.diff() > 0).all() for t in token_of_row.split(counts.tolist()))
    g = torch.randn_like(xs)
    (grad,) = torch.autograd.grad(xs, x, g)
    (grad_ref,) = torch.autograd.grad(xs_ref, x, g)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(grad, grad_ref, **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 4, 1, 3), (37, 8, 3, 33), (300, 64, 6, 16)])
def test_unpermute_matches_reference(device, dtype, shape):
    needs_kernel("moe_unpermute", device)
    n_tokens, n_experts, top_k, hidden = shape
    _, _, row_map = moe_permute_reference(torch.zeros(n_tokens, 1), _routing(n_tokens, n_experts, top_k, "cpu"), n_experts)
    row_map = row_map.to(device)
    y_sorted = torch.randn(n_tokens * top_k, hidden, device=device, dtype=dtype, requires_grad=True)
    weights = torch.rand(n_tokens, top_k, device=device, requires_grad=True)
    y = moe_unpermute(y_sorted, row_map, weights)
    y_ref = moe_unpermute_reference(y_sorted, row_map, weights)
    assert y.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    torch.testing.assert_close(y, y_ref, **tol)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (y_sorted, weights), g)
    grads_ref = torch.autograd.grad(y_ref, (y_sorted, weights), g)
    torch.testing.assert_close(grads[0], grads_ref[0], **tol)
    torch.testing.assert_close(grads[1], grads_ref[1], rtol=1e-4, atol=1e-4 if dtype == torch.float32 else 1e-2)


def test_route_permute_unpermute_is_the_moe_combine():
    # Expert e multiplies its rows by c[e]: the combined output must be x[n] * sum_j w[n, j] c[i[n, j]].
    torch.manual_seed(3)
    x, logits, scale = torch.randn(45, 12), torch.randn(45, 16), torch.randn(16)
    w, i = moe_route(logits, None, top_k=4, n_group=4, topk_group=2, scaling=2.0)
    xs, counts, row_map = moe_permute(x, i, 16)
    ys = torch.cat([rows * scale[e] for e, rows in enumerate(xs.split(counts.tolist()))])
    expected = x * (w * scale[i]).sum(dim=-1, keepdim=True)
    torch.testing.assert_close(moe_unpermute(ys, row_map, w), expected, rtol=1e-5, atol=1e-5)


def test_permute_rejects_out_of_range_experts():
    needs_kernel("moe_permute", "cpu")
    with pytest.raises(RuntimeError, match="out of range"):
        moe_permute(torch.randn(2, 3), torch.tensor([[0], [4]]), 4)


def test_gradcheck_float64():
    needs_kernel("moe_route", "cpu")
    torch.manual_seed(4)
    logits = torch.randn(9, 12, dtype=torch.float64, requires_grad=True)
    bias = 0.1 * torch.randn(12, dtype=torch.float64)
    for score in ["sigmoid", "softmax"]:
        route = lambda t: moe_route(t, bias, top_k=3, n_group=4, topk_group=2, scaling=2.5, score=score)[0]  # noqa: E731
        assert torch.autograd.gradcheck(route, (logits,))
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    indices = _routing(7, 6, 3, "cpu")
    assert torch.autograd.gradcheck(lambda t: moe_permute(t, indices, 6)[0], (x,))
    _, _, row_map = moe_permute(x.detach(), indices, 6)
    y_sorted = torch.randn(21, 5, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(7, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: moe_unpermute(a, row_map, b), (y_sorted, weights))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    needs_kernel("moe_route", device)
    torch.manual_seed(5)
    logits = torch.randn(11, 16, device=device, requires_grad=True)
    bias = torch.randn(16, device=device)
    ops = torch.ops.r1mega
    torch.library.opcheck(ops.moe_route.default, (logits, bias, 3, 4, 2, 2.5, "sigmoid", True))
    torch.library.opcheck(ops.moe_route.default, (logits, None, 3, 1, 1, 1.0, "softmax", False))
    w, i = moe_route(logits.detach(), bias, top_k=3, n_group=4, topk_group=2)
    torch.library.opcheck(ops.moe_route_backward.default, (torch.randn_like(w), logits.detach(), i, 2.5, "sigmoid", True))
    x = torch.randn(11, 7, device=device, requires_grad=True)
    torch.library.opcheck(ops.moe_permute.default, (x, i, 16))
    _, _, row_map = moe_permute(x.detach(), i, 16)
    torch.library.opcheck(ops.moe_permute_backward.default, (torch.randn(33, 7, device=device), row_map, 3))
    y_sorted = torch.randn(33, 7, device=device, requires_grad=True)
    weights = w.detach().requires_grad_()
    torch.library.opcheck(ops.moe_unpermute.default, (y_sorted, row_map, weights))
    torch.library.opcheck(
        ops.moe_unpermute_backward.default, (torch.randn(11, 7, device=device), y_sorted.detach(), row_map, w)
    )
