"""linear_logprob: the chunked kernels against materialised logits + log_softmax (forward, both gradients),
gradcheck in fp64, opcheck of the three schema ops, and the PyTorch fallback of the sharded path."""

import importlib

import pytest
import torch

from r1mega.ops import _extension
from r1mega.ops.linear_logprob import linear_logprob, linear_logprob_reference, logprob_forward, logprob_grads
from op_devices import DEVICES, needs_kernel

# The module itself: `r1mega.ops.linear_logprob` as an attribute is the public function.
llp_module = importlib.import_module("r1mega.ops.linear_logprob")

# dtype -> (atol, rtol) for logp/entropy and for the gradients (relative to their largest entry)
TOLERANCES = {torch.float64: (1e-10, 1e-10), torch.float32: (2e-5, 2e-5), torch.bfloat16: (2e-3, 2e-2)}


def make_inputs(n, h, v, dtype, device, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=gen) * scale).to(dtype).to(device)
    weight = (torch.randn(v, h, generator=gen) / h**0.5 * 4).to(dtype).to(device)
    targets = torch.randint(0, v, (n,), generator=gen).to(device)
    return hidden, weight, targets


def both(hidden, weight, targets, temperature=1.0, chunk_size=None):
    """(kernel, reference) outputs and gradients for the same random upstream grads of logp and entropy."""
    results = []
    for kernel in (True, False):
        h = hidden.detach().requires_grad_()
        w = weight.detach().requires_grad_()
        if kernel:
            logp, entropy = linear_logprob(h, w, targets, temperature=temperature, chunk_size=chunk_size)
        else:
            logp, entropy = linear_logprob_reference(h, w, targets, temperature=temperature)
        gen = torch.Generator().manual_seed(1)
        g_logp = torch.randn(logp.shape, generator=gen, dtype=logp.dtype).to(logp.device)
        g_ent = torch.randn(logp.shape, generator=gen, dtype=logp.dtype).to(logp.device)
        grads = torch.autograd.grad((logp * g_logp + entropy * g_ent).sum(), (h, w))
        results.append((logp, entropy, *grads))
    return results


def assert_close_rel(actual, expected, atol, rtol):
    scale = expected.abs().max().clamp(min=1.0)
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol * scale.item(), rtol=rtol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n,h,v,chunk,temperature", [
    (37, 16, 101, 16, 1.0),    # odd N, V not a multiple of the chunk
    (5, 24, 64, 64, 0.7),      # one chunk exactly, temperature < 1
    (1, 8, 300, 7, 1.6),       # a single row, tiny odd chunks
    (64, 32, 257, None, 1.0),  # default chunk size
])
def test_matches_reference(device, dtype, n, h, v, chunk, temperature):
    needs_kernel("linear_logprob", device)
    hidden, weight, targets = make_inputs(n, h, v, dtype, device)
    (logp, ent, gh, gw), (logp_r, ent_r, gh_r, gw_r) = both(hidden, weight, targets, temperature=temperature,
                                                            chunk_size=chunk)
    atol, rtol = TOLERANCES[dtype]
    assert logp.dtype == logp_r.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert gh.dtype == dtype and gw.dtype == dtype
    assert_close_rel(logp, logp_r, atol, rtol)
    assert_close_rel(ent, ent_r, atol, rtol)
    assert_close_rel(gh, gh_r.to(dtype), atol, rtol)
    assert_close_rel(gw, gw_r.to(dtype), atol, rtol)


@pytest.mark.parametrize("device", DEVICES)
def test_huge_logits(device):
    """Logits around 1e4: the relative online statistics keep logp and a near-zero entropy exact."""
    needs_kernel("linear_logprob", device)
    hidden, weight, targets = make_inputs(19, 16, 150, torch.float32, device, scale=2000.0)
    (logp, ent, gh, gw), (logp_r, ent_r, gh_r, gw_r) = both(hidden, weight, targets, chunk_size=32)
    assert logp_r.abs().max() > 1e3
    assert torch.isfinite(logp).all() and torch.isfinite(ent).all()
    torch.testing.assert_close(logp, logp_r, atol=1e-6 * logp_r.abs().max().item(), rtol=1e-5)
    torch.testing.assert_close(ent, ent_r, atol=1e-4, rtol=1e-4)
    assert_close_rel(gh, gh_r, 1e-5, 1e-4)
    assert_close_rel(gw, gw_r, 1e-5, 1e-4)


@pytest.mark.parametrize("device", DEVICES)
def test_only_one_output_used(device):
    """A graph using only entropy (or only logp) gets the gradient of that output alone."""
    needs_kernel("linear_logprob", device)
    hidden, weight, targets = make_inputs(9, 8, 40, torch.float64, device)
    for pick in (0, 1):
        grads = []
        for kernel in (True, False):
            h = hidden.detach().requires_grad_()
            fn = linear_logprob if kernel else linear_logprob_reference
            out = fn(h, weight, targets, **({"chunk_size": 16} if kernel else {}))[pick]
            grads.append(torch.autograd.grad(out.sum(), h)[0])
        torch.testing.assert_close(grads[0], grads[1])


def test_gradcheck_fp64():
    needs_kernel("linear_logprob", "cpu")
    hidden, weight, targets = make_inputs(6, 5, 23, torch.float64, "cpu")
    h = hidden.requires_grad_()
    w = weight.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda h, w: linear_logprob(h, w, targets, temperature=0.9, chunk_size=4), (h, w))


def test_opcheck():
    needs_kernel("linear_logprob", "cpu")
    hidden, weight, targets = make_inputs(7, 8, 30, torch.float32, "cpu")
    ops = torch.ops.r1mega
    torch.library.opcheck(ops.linear_logprob.default,
                          (hidden.clone().requires_grad_(), weight.clone().requires_grad_(), targets, 0.8, 8))
    torch.library.opcheck(ops.linear_logprob_stats.default, (hidden, weight, targets, 0.8, 30, 8))
    logp, entropy, lse = ops.linear_logprob(hidden, weight, targets, 0.8, 8)
    torch.library.opcheck(ops.linear_logprob_backward.default,
                          (torch.randn(7), torch.randn(7), hidden, weight, targets, lse, entropy, 0.8, 0, 8))


def test_targets_out_of_range():
    needs_kernel("linear_logprob", "cpu")
    hidden, weight, targets = make_inputs(4, 8, 30, torch.float32, "cpu")
    targets[2] = 30
    with pytest.raises(RuntimeError, match=r"\[0, V\)"):
        linear_logprob(hidden, weight, targets)


@pytest.mark.parametrize("shard", [0, 1, 2])
def test_shard_stats_and_grads(shard, monkeypatch):
    """One vocabulary shard's partial statistics, combined by hand with the other shards' (what the
    all-reduce does), give the full-vocabulary result; so do the kernels and the PyTorch fallback."""
    hidden, weight, targets = make_inputs(11, 8, 90, torch.float64, "cpu")
    logp_r, ent_r = linear_logprob_reference(hidden, weight, targets, temperature=1.3)
    for use_kernel in (True, False):
        if use_kernel:
            needs_kernel("linear_logprob_stats", "cpu")
        else:
            monkeypatch.setattr(_extension, "has_kernel", lambda op, device: False)
        stats = [llp_module._stats(hidden, weight[30 * r: 30 * (r + 1)], targets, 1.3, 30 * r, 7) for r in range(3)]
        m, s, t, zt = (torch.stack(x) for x in zip(*stats))  # [3, N] each
        big_m = m.amax(0)
        a = (m - big_m).exp()
        big_s, big_t = (s * a).sum(0), (a * (t + s * (m - big_m))).sum(0)
        lse = big_m + big_s.log()
        torch.testing.assert_close(zt.sum(0) - lse, logp_r)
        torch.testing.assert_close(big_s.log() - big_t / big_s, ent_r)
        # the gradient of one shard of weight, against autograd on the full materialised reference
        g = torch.randn(11, dtype=torch.float64)
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_()
        lp, en = linear_logprob_reference(h, w, targets, temperature=1.3)
        gh_r, gw_r = torch.autograd.grad((lp * g + en * g).sum(), (h, w))
        gh_parts = []
        for r in range(3):
            gh, gw = llp_module._backward(g, g, hidden, weight[30 * r: 30 * (r + 1)], targets, lse, ent_r, 1.3,
                                          30 * r, 7)
            torch.testing.assert_close(gw, gw_r[30 * r: 30 * (r + 1)])
            gh_parts.append(gh)
        torch.testing.assert_close(sum(gh_parts), gh_r)
        monkeypatch.undo()


def test_logprob_forward_and_grads_single_process_fallback(monkeypatch):
    """The no-kernel path of the helpers linear_grpo_loss uses (group=None)."""
    monkeypatch.setattr(_extension, "has_kernel", lambda op, device: False)
    hidden, weight, targets = make_inputs(10, 8, 50, torch.float64, "cpu")
    logp, entropy, lse = logprob_forward(hidden, weight, targets, 0.9, 16)
    logp_r, ent_r = linear_logprob_reference(hidden, weight, targets, temperature=0.9)
    torch.testing.assert_close(logp, logp_r)
    torch.testing.assert_close(entropy, ent_r)
    g = torch.randn(10, dtype=torch.float64)
    gh, gw = logprob_grads(g, torch.zeros_like(g), hidden, weight, targets, lse, entropy, 0.9, 16)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    gh_r, gw_r = torch.autograd.grad((linear_logprob_reference(h, w, targets, temperature=0.9)[0] * g).sum(), (h, w))
    torch.testing.assert_close(gh, gh_r)
    torch.testing.assert_close(gw, gw_r)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_realistic_shape():
    """A vocabulary of 32k in 4 uneven chunks at bf16: the cuBLAS fp32-output GEMMs and fused kernels."""
    needs_kernel("linear_logprob", "cuda")
    hidden, weight, targets = make_inputs(1000, 256, 32_003, torch.bfloat16, "cuda")
    (logp, ent, gh, gw), (logp_r, ent_r, gh_r, gw_r) = both(hidden, weight, targets, temperature=0.7,
                                                            chunk_size=8192)
    assert_close_rel(logp, logp_r, 1e-4, 1e-3)
    assert_close_rel(ent, ent_r, 1e-4, 1e-3)
    assert_close_rel(gh, gh_r.bfloat16(), 2e-3, 2e-2)
    assert_close_rel(gw, gw_r.bfloat16(), 2e-3, 2e-2)
