"""grpo_loss: the plain-PyTorch reference against the spec's formula, and the compiled kernels against
the reference (forward, statistics, backward), on odd shapes, masks, dtypes and the edge cases."""

import pytest
import torch

from r1mega.ops.grpo_loss import AGGREGATIONS, grpo_loss, grpo_loss_reference
from op_devices import DEVICES, needs_kernel


def make_inputs(B=5, T=37, *, dtype=torch.float32, device="cpu", per_token=False, spread=0.4, seed=0):
    """Log-probs near each other (ratios around 1, some clipped), a ragged mask with one empty row and
    one single-token row, advantages of both signs and one exact zero."""
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 4
    old = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * spread
    ref = logp + torch.randn(B, T, generator=g, dtype=torch.float64) * spread
    adv = torch.randn(B, T, generator=g, dtype=torch.float64) if per_token else torch.randn(B, generator=g, dtype=torch.float64)
    adv.view(-1)[1] = 0.0
    lengths = torch.randint(1, T + 1, (B,), generator=g)
    lengths[0], lengths[-1] = 0, 1
    mask = torch.arange(T)[None, :] < lengths[:, None]  # [B, T]
    cast = lambda t: t.to(dtype=dtype, device=device)  # noqa: E731
    return cast(logp), cast(old), cast(ref), adv.to(dtype=torch.float32 if dtype != torch.float64 else dtype, device=device), mask.to(device)


def spec_loss(logp, old, ref, adv, mask, clip_low, clip_high, beta, agg):
    """The formula exactly as the spec writes it (min of the two surrogates), for well-scaled inputs."""
    m = mask.double()
    a = (adv[:, None] if adv.dim() == 1 else adv).double()
    ratio = torch.exp(logp.double() - old.double())
    surr = torch.min(ratio * a, torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * a)
    kl = 0 if ref is None else torch.exp(ref.double() - logp.double()) - (ref.double() - logp.double()) - 1
    per_token = -(surr - beta * kl) * m
    rows = m.sum(1) > 0
    if agg == "token-mean":
        return per_token.sum() / m.sum()
    if agg == "seq-mean-token-mean":
        return (per_token.sum(1)[rows] / m.sum(1)[rows]).mean()
    if agg == "seq-mean-token-sum":
        return per_token.sum(1)[rows].mean()
    return (per_token.sum(1)[rows] / logp.shape[1]).mean()


def run(fn, logp, *args, **kw):
    leaf = logp.detach().requires_grad_()
    loss, stats = fn(leaf, *args, **kw)
    (grad,) = torch.autograd.grad(loss, leaf)
    return loss.detach(), stats, grad


@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("with_ref", [True, False])
def test_reference_is_the_spec_formula(agg, per_token, with_ref):
    logp, old, ref, adv, mask = make_inputs(dtype=torch.float64, per_token=per_token)
    ref = ref if with_ref else None
    loss, stats = grpo_loss_reference(logp, old, ref, adv, mask, clip_low=0.2, clip_high=0.28, beta=0.05, agg=agg)
    torch.testing.assert_close(loss, spec_loss(logp, old, ref, adv, mask, 0.2, 0.28, 0.05, agg))
    valid = mask
    ratio = torch.exp(logp - old)[valid]
    torch.testing.assert_close(stats["ratio_min"], ratio.min())
    torch.testing.assert_close(stats["ratio_max"], ratio.max())
    torch.testing.assert_close(stats["ratio_mean"], ratio.mean())
    if with_ref:
        x = (ref - logp)[valid]
        torch.testing.assert_close(stats["kl"], (x.exp() - x - 1).mean())


def test_reference_clip_fraction_counts_cut_gradients():
    # ratios 2.0 and 0.5 against A = +1 / -1 and clip 0.2: clipped iff the gradient is cut.
    logp = torch.log(torch.tensor([[2.0, 0.5, 1.1], [2.0, 0.5, 0.9]]))
    old = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 3, dtype=torch.bool)
    _, stats, grad = run(grpo_loss_reference, logp, old, None, adv, mask, agg="token-mean")
    # A>0: ratio 2.0 clipped (cut), 0.5 not; A<0: 0.5 clipped, 2.0 not.
    assert stats["clip_fraction"].item() == pytest.approx(2 / 6)
    assert grad[0, 0] == 0 and grad[1, 1] == 0 and (grad[0, 1] != 0) and (grad[1, 0] != 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("agg", AGGREGATIONS)
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("with_ref", [True, False])
def test_kernel_matches_reference_fp32(device, agg, per_token, with_ref):
    needs_kernel("grpo_loss", device)
    logp, old, ref, adv, mask = make_inputs(B=6, T=41, device=device, per_token=per_token)
    ref = ref if with_ref else None
    kw = dict(clip_low=0.2, clip_high=0.28, beta=0.05, agg=agg)
    loss, stats, grad = run(grpo_loss, logp, old, ref, adv, mask, **kw)
    loss_r, stats_r, grad_r = run(grpo_loss_reference, logp, old, ref, adv, mask, **kw)
    torch.testing.assert_close(loss, loss_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, grad_r, rtol=1e-5, atol=1e-7)
    for name in stats_r:
        torch.testing.assert_close(stats[name], stats_r[name], rtol=1e-5, atol=1e-6, msg=name)
        assert not stats[name].requires_grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("agg", ["seq-mean-token-mean", "token-mean"])
def test_kernel_matches_reference_bf16(device, agg):
    needs_kernel("grpo_loss", device)
    logp, old, ref, adv, mask = make_inputs(B=4, T=300, dtype=torch.bfloat16, device=device)
    loss, stats, grad = run(grpo_loss, logp, old, ref, adv, mask, beta=0.05, agg=agg)
    loss_r, stats_r, grad_r = run(grpo_loss_reference, logp, old, ref, adv, mask, beta=0.05, agg=agg)
    assert grad.dtype == torch.bfloat16 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, loss_r, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad.float(), grad_r.float(), rtol=1e-2, atol=1e-5)
    torch.testing.assert_close(stats["clip_fraction"], stats_r["clip_fraction"])


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_keep_fp32_old_logp(device):
    """bf16 logp with fp32 old/ref logprobs: the fp32 values are not rounded to bf16."""
    needs_kernel("grpo_loss", device)
    logp, old, ref, adv, mask = make_inputs(B=3, T=64, device=device)
    logp = logp.bfloat16()
    loss, _, grad = run(grpo_loss, logp, old, ref, adv, mask, agg="token-mean")
    loss_r, _, grad_r = run(grpo_loss_reference, logp.float(), old, ref, adv, mask, agg="token-mean")
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, loss_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.float(), grad_r, rtol=1e-2, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("agg", AGGREGATIONS)
def test_gradcheck_fp64(device, agg):
    needs_kernel("grpo_loss", device)
    logp, old, ref, adv, mask = make_inputs(B=3, T=5, dtype=torch.float64, device=device, seed=3)
    fn = lambda lp: grpo_loss(lp, old, ref, adv, mask, beta=0.3, agg=agg)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (logp.detach().requires_grad_(),))


@pytest.mark.parametrize("device", DEVICES)
def test_fully_masked_batch_gives_zero(device):
    needs_kernel("grpo_loss", device)
    logp, old, ref, adv, _ = make_inputs(B=3, T=8, device=device)
    mask = torch.zeros(3, 8, dtype=torch.bool, device=device)
    for agg in AGGREGATIONS:
        loss, stats, grad = run(grpo_loss, logp, old, ref, adv, mask, agg=agg)
        assert loss.item() == 0 and grad.abs().sum().item() == 0
        assert all(v.item() == 0 for v in stats.values())


@pytest.mark.parametrize("device", DEVICES)
def test_one_token_sequences(device):
    needs_kernel("grpo_loss", device)
    logp, old, ref, adv, mask = make_inputs(B=9, T=1, device=device)
    mask[:] = True
    for agg in AGGREGATIONS:
        loss, _, grad = run(grpo_loss, logp, old, ref, adv, mask, agg=agg)
        loss_r, _, grad_r = run(grpo_loss_reference, logp, old, ref, adv, mask, agg=agg)
        torch.testing.assert_close(loss, loss_r)
        torch.testing.assert_close(grad, grad_r)


@pytest.mark.parametrize("device", DEVICES)
def test_masked_garbage_is_ignored(device):
    """inf/NaN at masked positions (padding) never reach the loss or the gradient."""
    needs_kernel("grpo_loss", device)
    logp, old, ref, adv, mask = make_inputs(B=4, T=16, device=device, per_token=True)
    garbage = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30], device=device)
    pad = ~mask
    idx = torch.arange(int(pad.sum()), device=device) % 4
    for t in (old, ref, adv):
        t[pad] = garbage[idx]
    loss, stats, grad = run(grpo_loss, logp, old, ref, adv, mask, beta=0.1)
    loss_r, stats_r, grad_r = run(grpo_loss_reference, logp, old, ref, adv, mask, beta=0.1)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss, loss_r)
    torch.testing.assert_close(grad, grad_r)
    assert all(torch.isfinite(v) for v in stats.values())


@pytest.mark.parametrize("device", DEVICES)
def test_huge_log_ratio_differences(device):
    """|log-ratios| up to 80 (exp ~ 5e34, still finite in fp32): finite and equal to the reference;
    an advantage of 0 with a huge ratio gives 0, not inf * 0 = NaN."""
    needs_kernel("grpo_loss", device)
    B, T = 4, 6
    logp = torch.full((B, T), -1.0, device=device)
    old = logp + torch.tensor([80.0, -80.0, 60.0, -60.0, 0.5, -0.5], device=device)  # ratio e^-80 .. e^80
    ref = logp + torch.tensor([-80.0, 80.0, -30.0, 30.0, 80.0, -80.0], device=device)
    adv = torch.tensor([1.0, -1.0, 0.0, 2.0], device=device)
    mask = torch.ones(B, T, dtype=torch.bool, device=device)
    for agg in AGGREGATIONS:
        loss, stats, grad = run(grpo_loss, logp, old, ref, adv, mask, beta=1e-3, agg=agg)
        loss_r, stats_r, grad_r = run(grpo_loss_reference, logp, old, ref, adv, mask, beta=1e-3, agg=agg)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        torch.testing.assert_close(loss, loss_r, rtol=1e-5, atol=0)
        torch.testing.assert_close(grad, grad_r, rtol=1e-5, atol=0)
        for name in stats_r:
            torch.testing.assert_close(stats[name], stats_r[name], rtol=1e-5, atol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_overflow_matches_reference(device):
    """Beyond fp32's exp range the kernel gives inf exactly where the reference does (and no NaN)."""
    needs_kernel("grpo_loss", device)
    logp = torch.zeros(2, 3, device=device)
    old = torch.tensor([[-100.0, 0.0, 0.0], [0.0, 0.0, 0.0]], device=device)  # ratio e^100 = inf in fp32
    adv = torch.tensor([-1.0, 1.0], device=device)
    mask = torch.ones(2, 3, dtype=torch.bool, device=device)
    loss, _, _ = run(grpo_loss, logp, old, None, adv, mask)
    loss_r, _, _ = run(grpo_loss_reference, logp, old, None, adv, mask)
    assert loss.item() == loss_r.item() == float("inf")
    adv = torch.tensor([1.0, 1.0], device=device)  # clipped branch: finite, no gradient through the ratio
    loss, _, grad = run(grpo_loss, logp, old, None, adv, mask)
    loss_r, _, grad_r = run(grpo_loss_reference, logp, old, None, adv, mask)
    torch.testing.assert_close(loss, loss_r)
    torch.testing.assert_close(grad, grad_r)


def paper_loss_fp64(logp, old, ref, adv, mask, clip_low, clip_high, beta):
    """The paper's objective evaluated literally in float64 (seq-mean-token-mean), with its gradient:
    exp does not overflow there below 709, so min(r A, clip(r) A) with A = 0 is 0 and r A with a tiny A
    is the finite product."""
    lp = logp.double().requires_grad_()
    a = adv.double()[:, None]
    ratio = torch.exp(lp - old.double())
    surr = torch.min(ratio * a, torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * a)
    x = ref.double() - lp
    per_token = -(surr - beta * (torch.exp(x) - x - 1)) * mask
    loss = (per_token.sum(1) / mask.sum(1)).mean()
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad


OVERFLOW_CASES = {  # advantage, log-ratios (4 tokens; e^88.8 and up are beyond fp32), log(pi_ref / pi)
    "A=0": (0.0, [89.0, 100.0, 0.1, -0.1], [0.1, -0.2, 0.3, 0.0]),
    "A>0 clipped": (1.0, [89.0, 100.0, 0.1, -3.0], [0.1, -0.2, 0.3, 0.0]),
    "A<0 tiny": (-1e-30, [89.0, 100.0, 0.1, -0.1], [0.1, -0.2, 0.3, 0.0]),  # r A = -4.5e8, -2.7e13
    "A<0 product in range": (-0.5, [88.9, 0.1, -0.1, 0.0], [0.1, -0.2, 0.3, 0.0]),  # r = inf in fp32, r A = -2.1e38
    "KL beyond exp's range": (0.7, [0.1, -0.1, 0.0, 0.05], [89.0, 0.2, -0.3, 0.0]),  # beta e^89 = 4.5e35
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fn", [grpo_loss_reference, grpo_loss], ids=["reference", "kernel"])
@pytest.mark.parametrize("case", OVERFLOW_CASES)
@pytest.mark.parametrize("beta", [1e-3, 0.0])
def test_overflowing_ratio_keeps_the_formulas_value(device, fn, case, beta):
    """A ratio (or e^x of the KL) beyond fp32's range is a finite number: each term has the value of
    the paper's formula evaluated in float64, rounded to fp32 (A = 0 gives 0, not inf * 0 = NaN).
    Tolerance: exp's argument x + ln|A| (|.| < 128) carries up to ~1 ulp = 7.6e-6 of absolute rounding,
    i.e. that relative error in the product."""
    if fn is grpo_loss:
        needs_kernel("grpo_loss", device)
    adv, log_ratio, log_ref = OVERFLOW_CASES[case]
    logp = torch.full((1, 4), -1.0, device=device)
    old = logp - torch.tensor([log_ratio], device=device)
    ref = logp + torch.tensor([log_ref], device=device)
    adv = torch.tensor([adv], device=device)
    mask = torch.ones(1, 4, dtype=torch.bool, device=device)
    loss, _, grad = run(fn, logp, old, ref, adv, mask, clip_low=0.2, clip_high=0.28, beta=beta)
    loss_64, grad_64 = paper_loss_fp64(logp, old, ref, adv, mask, 0.2, 0.28, beta)
    assert torch.isfinite(loss_64) and torch.isfinite(grad_64.float()).all()  # the cases are in fp32's range
    torch.testing.assert_close(loss, loss_64.float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad, grad_64.float(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
def test_max_len_normaliser(device):
    needs_kernel("grpo_loss", device)
    logp, old, ref, adv, mask = make_inputs(B=4, T=10, device=device)
    kw = dict(agg="seq-mean-token-sum-norm", beta=0.05)
    loss, _, grad = run(grpo_loss, logp, old, ref, adv, mask, max_len=25, **kw)
    loss_t, _, grad_t = run(grpo_loss, logp, old, ref, adv, mask, **kw)
    torch.testing.assert_close(loss * 25, loss_t * 10)
    torch.testing.assert_close(grad * 25, grad_t * 10)
    loss_r, _, _ = run(grpo_loss_reference, logp, old, ref, adv, mask, max_len=25, **kw)
    torch.testing.assert_close(loss, loss_r)


@pytest.mark.parametrize("device", DEVICES)
def test_float_mask_and_upstream_grad(device):
    needs_kernel("grpo_loss", device)
    logp, old, ref, adv, mask = make_inputs(B=3, T=20, device=device)
    leaf = logp.detach().requires_grad_()
    loss, _ = grpo_loss(leaf, old, ref, adv, mask.float())
    (3.5 * loss).backward()
    loss_r, _, grad_r = run(grpo_loss_reference, logp, old, ref, adv, mask)
    torch.testing.assert_close(loss.detach(), loss_r)
    torch.testing.assert_close(leaf.grad, 3.5 * grad_r)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    needs_kernel("grpo_loss", device)
    ops = torch.ops.r1mega
    logp, old, ref, adv, mask = make_inputs(B=3, T=9, device=device)
    logp.requires_grad_()
    torch.library.opcheck(ops.grpo_loss.default, (logp, old, ref, adv, mask, 0.2, 0.28, 0.01, "seq-mean-token-mean", 9))
    torch.library.opcheck(ops.grpo_loss.default, (logp, old, None, adv[:, None].expand(3, 9).contiguous(), mask.float(),
                                                  0.2, 0.2, 0.0, "token-mean", 9))
    _, _, factor, scale = ops.grpo_loss(logp.detach(), old, ref, adv, mask, 0.2, 0.2, 0.01, "seq-mean-token-sum", 9)
    torch.library.opcheck(ops.grpo_loss_backward.default,
                          (torch.tensor(1.5, device=device), factor, scale, torch.bfloat16))


def test_bad_arguments():
    logp, old, ref, adv, mask = make_inputs(B=2, T=3)
    with pytest.raises(ValueError, match="agg"):
        grpo_loss(logp, old, ref, adv, mask, agg="mean")
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(logp, old, ref, adv[:1], mask)


# The kernel in a fresh process with ATen at AVX-512 and lowered to AVX2: loss, statistics and gradient
# bit for bit, so that train.cpu_isa=avx2 makes a run the same on every CPU that has AVX2. (The baseline
# SSE2 build has no FMA and rounds differently: a CPU without AVX2 cannot be pinned to it anyway.)
_ISA_PROBE = """
import hashlib, sys, torch
sys.path[:0] = [{tests!r}, {tests!r} + '/..']
from test_op_grpo_loss import make_inputs, run
from r1mega.ops.grpo_loss import grpo_loss
logp, old, ref, adv, mask = make_inputs(B=6, T=301, spread=0.6)
loss, stats, grad = run(grpo_loss, logp, old, ref, adv, mask, clip_low=0.2, clip_high=0.28, beta=0.01)
digest = hashlib.sha256(loss.numpy().tobytes() + grad.numpy().tobytes())
for value in stats.values():
    digest.update(value.detach().numpy().tobytes())
print(torch.backends.cpu.get_cpu_capability(), digest.hexdigest())
"""


def test_kernel_gives_the_same_bits_on_every_isa():
    import os
    import subprocess
    import sys
    from pathlib import Path

    needs_kernel("grpo_loss", "cpu")
    code = _ISA_PROBE.format(tests=str(Path(__file__).resolve().parent))
    seen = {}
    for isa in ("avx512", "avx2"):
        env = {**os.environ, "ATEN_CPU_CAPABILITY": isa, "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        capability, digest = done.stdout.split()
        seen[capability] = digest  # a CPU without the ISA runs a lower one: the same key again
    if "AVX2" not in seen:
        pytest.skip(f"this CPU has no AVX2 ({seen})")
    if len(seen) == 1:
        pytest.skip("this CPU has no AVX-512: one ISA to compare")
    assert len(set(seen.values())) == 1, seen
