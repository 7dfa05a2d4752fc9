"""linear_grpo_loss against materialised logits -> log_softmax -> grpo_loss_reference: loss, statistics and
the gradients of hidden and weight, for every aggregation mode, masks, dtypes and temperatures."""

import pytest
import torch

from r1mega.ops import _extension
from r1mega.ops.grpo_loss import AGGREGATIONS
from r1mega.ops.linear_grpo_loss import STAT_NAMES, linear_grpo_loss, linear_grpo_loss_reference
from r1mega.ops.linear_logprob import linear_logprob_reference
from op_devices import DEVICES

TOLERANCES = {torch.float64: 1e-9, torch.float32: 2e-5, torch.bfloat16: 2e-2}


def make_batch(b, t, h, v, dtype, device, temperature, per_token_adv=False, with_ref=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=gen).to(dtype).to(device)
    weight = (torch.randn(v, h, generator=gen) / h**0.5 * 3).to(dtype).to(device)
    targets = torch.randint(0, v, (b, t), generator=gen).to(device)
    logp = linear_logprob_reference(hidden.reshape(-1, h), weight, targets.reshape(-1),
                                    temperature=temperature)[0].view(b, t)
    # old and reference policies near the current one, so that some ratios clip and some do not
    old = (logp + 0.3 * torch.randn(b, t, generator=gen).to(device)).to(logp.dtype)
    ref = (logp + 0.3 * torch.randn(b, t, generator=gen).to(device)).to(logp.dtype) if with_ref else None
    adv = torch.randn((b, t) if per_token_adv else (b,), generator=gen).to(logp.dtype).to(device)
    mask = torch.rand(b, t, generator=gen).to(device) > 0.25
    mask[0] = False  # a fully masked row is ignored
    return hidden, weight, targets, old, ref, adv, mask


def run_both(batch, chunk_size=None, upstream=2.5, **kw):
    hidden, weight, targets, old, ref, adv, mask = batch
    out = []
    for kernel in (True, False):
        h = hidden.detach().requires_grad_()
        w = weight.detach().requires_grad_()
        if kernel:
            loss, stats = linear_grpo_loss(h, w, targets, old, ref, adv, mask, chunk_size=chunk_size, **kw)
        else:
            loss, stats = linear_grpo_loss_reference(h, w, targets, old, ref, adv, mask, **kw)
        grads = torch.autograd.grad(loss * upstream, (h, w))
        out.append((loss, stats, *grads))
    return out


def assert_close_rel(actual, expected, tol):
    scale = expected.abs().max().clamp(min=1e-3).item()
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_matches_reference(device, agg, dtype):
    temperature = 0.8
    batch = make_batch(4, 9, 16, 101, dtype, device, temperature)
    kw = dict(temperature=temperature, clip_low=0.2, clip_high=0.28, beta=0.01, agg=agg)
    (loss, stats, gh, gw), (loss_r, stats_r, gh_r, gw_r) = run_both(batch, chunk_size=16, **kw)
    tol = TOLERANCES[dtype]
    assert loss.dim() == 0 and set(stats) == set(STAT_NAMES)
    assert 0 < stats_r["clip_fraction"] < 1  # the data exercise both branches
    torch.testing.assert_close(loss, loss_r, atol=tol, rtol=tol)
    for name in STAT_NAMES:
        assert stats[name].dim() == 0
        torch.testing.assert_close(stats[name].float(), stats_r[name].float(), atol=tol, rtol=tol, msg=name)
    assert gh.dtype == dtype and gw.dtype == dtype
    assert_close_rel(gh, gh_r.to(dtype), tol)
    assert_close_rel(gw, gw_r.to(dtype), tol)


@pytest.mark.parametrize("device", DEVICES)
def test_no_ref_per_token_advantages_temperature(device):
    temperature = 1.7
    batch = make_batch(3, 11, 8, 77, torch.float64, device, temperature, per_token_adv=True, with_ref=False)
    kw = dict(temperature=temperature, agg="token-mean", beta=0.5, max_len=None)
    (loss, stats, gh, gw), (loss_r, stats_r, gh_r, gw_r) = run_both(batch, chunk_size=10, **kw)
    torch.testing.assert_close(loss, loss_r)
    torch.testing.assert_close(gh, gh_r)
    torch.testing.assert_close(gw, gw_r)
    torch.testing.assert_close(stats["kl"], stats_r["kl"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_on_policy_old_logp_is_the_current_logp(device, agg):
    # old_logp=None must mean "old policy = current policy": the reference fed the current policy's own
    # logprobs (from materialised logits), detached, as old_logp
    temperature = 0.9
    hidden, weight, targets, _, ref, adv, mask = make_batch(4, 9, 16, 101, torch.float64, device, temperature)
    current = linear_logprob_reference(hidden.reshape(-1, 16), weight, targets.reshape(-1),
                                       temperature=temperature)[0].view(4, 9)
    kw = dict(temperature=temperature, beta=0.01, agg=agg)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss, stats = linear_grpo_loss(h, w, targets, None, ref, adv, mask, chunk_size=16, **kw)
    gh, gw = torch.autograd.grad(loss, (h, w))
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss_r, _ = linear_grpo_loss_reference(h, w, targets, current, ref, adv, mask, **kw)
    gh_r, gw_r = torch.autograd.grad(loss_r, (h, w))
    torch.testing.assert_close(loss, loss_r)
    torch.testing.assert_close(gh, gh_r)
    torch.testing.assert_close(gw, gw_r)
    assert stats["clip_fraction"] == 0 and stats["ratio_min"] == 1 and stats["ratio_max"] == 1
    _, _, logp = linear_grpo_loss(hidden, weight, targets, None, ref, adv, mask, return_logp=True, **kw)
    assert not logp.requires_grad
    torch.testing.assert_close(logp, current)


def test_gradcheck_fp64():
    hidden, weight, targets, old, ref, adv, mask = make_batch(2, 5, 4, 13, torch.float64, "cpu", 1.0)
    h = hidden.requires_grad_()
    w = weight.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda h, w: linear_grpo_loss(h, w, targets, old, ref, adv, mask, clip_low=10.0, clip_high=10.0,
                                      beta=0.1, chunk_size=4)[0], (h, w))


def test_no_grad_inputs_skip_the_gradient_pass():
    hidden, weight, targets, old, ref, adv, mask = make_batch(2, 5, 4, 13, torch.float32, "cpu", 1.0)
    loss, _ = linear_grpo_loss(hidden, weight, targets, old, ref, adv, mask)
    loss_r, _ = linear_grpo_loss_reference(hidden, weight, targets, old, ref, adv, mask)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, loss_r)


def test_uses_the_compiled_kernels_when_built():
    """Guards against silently benchmarking the fallback: the stats/backward kernels are there on CPU."""
    if not _extension.BUILD.startswith("compiled"):
        pytest.skip(f"kernels not built ({_extension.BUILD})")
    assert _extension.has_kernel("linear_logprob", "cpu")
    assert _extension.has_kernel("linear_logprob_backward", "cpu")
