"""group_advantages: the reference against a per-group loop over torch.mean/torch.std (what TRL and verl
compute), and the compiled kernels against the reference, including unequal and unsorted groups."""

import pytest
import torch

from r1mega.ops.group_advantages import group_advantages, group_advantages_reference
from op_devices import DEVICES, needs_kernel


def loop_advantages(rewards, ids, eps, scale_by_std):
    """One group at a time with torch.std (unbiased); equal-reward groups and singletons give 0."""
    out = torch.zeros_like(rewards, dtype=torch.float64)
    for g in ids.unique():
        sel = ids == g
        r = rewards[sel].double()
        if r.numel() == 1 or bool((r == r[0]).all()):
            continue
        centred = r - r.mean()
        out[sel] = centred / (r.std() + eps) if scale_by_std else centred
    return out.to(rewards.dtype)


def mixed_rewards(n_groups, size, seed=0):
    """0/1 rewards (the usual correctness reward) with a few all-equal groups, plus a fractional part."""
    g = torch.Generator().manual_seed(seed)
    r = (torch.rand(n_groups, size, generator=g) > 0.5).float() + 0.1 * torch.rand(n_groups, size, generator=g).round(decimals=1)
    r[0] = 1.0
    r[1] = 0.1  # equal rewards whose mean is not exactly 0.1 in floating point
    return r.view(-1)


@pytest.mark.parametrize("scale_by_std", [True, False])
def test_reference_fixed_groups_is_per_group_std(scale_by_std):
    r = mixed_rewards(6, 5)
    ids = torch.arange(30) // 5
    expected = loop_advantages(r, ids, 1e-6, scale_by_std)
    torch.testing.assert_close(group_advantages_reference(r, group_size=5, scale_by_std=scale_by_std), expected)
    torch.testing.assert_close(group_advantages_reference(r, group_ids=ids, scale_by_std=scale_by_std), expected)


def test_reference_unequal_unsorted_groups():
    g = torch.Generator().manual_seed(1)
    ids = torch.tensor([7, -3, 7, 100, 7, -3, 42, 100, 7, 5, 5, 5])  # sizes 4, 2, 2, 1, 3
    r = torch.randn(12, generator=g)
    r[ids == 5] = 0.3
    adv = group_advantages_reference(r, group_ids=ids)
    torch.testing.assert_close(adv, loop_advantages(r, ids, 1e-6, True))
    assert adv[6].item() == 0.0  # group of one
    assert (adv[ids == 5] == 0).all()  # equal rewards: exactly 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scale_by_std", [True, False])
@pytest.mark.parametrize("size", [1, 2, 16, 33])
def test_kernel_fixed_groups(device, dtype, scale_by_std, size):
    needs_kernel("group_advantages", device)
    r = mixed_rewards(9, size).to(device=device, dtype=dtype)
    out = group_advantages(r, group_size=size, scale_by_std=scale_by_std)
    expected = group_advantages_reference(r, group_size=size, scale_by_std=scale_by_std)
    assert out.dtype == dtype
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    # all-equal groups (rows 0, 1 and every group of one) are exactly 0
    equal = r.view(-1, size).eq(r.view(-1, size)[:, :1]).all(1).repeat_interleave(size)
    assert (out[equal] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32])
def test_kernel_group_ids(device, id_dtype):
    needs_kernel("group_advantages", device)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(-50, 50, (300,), generator=g)  # unequal sizes, some singletons, unsorted
    r = torch.randn(300, generator=g)
    r[ids == ids[0]] = 2.5
    r, ids = r.to(device), ids.to(device=device, dtype=id_dtype)
    for scale in (True, False):
        out = group_advantages(r, group_ids=ids, eps=1e-4, scale_by_std=scale)
        torch.testing.assert_close(out, group_advantages_reference(r, group_ids=ids, eps=1e-4, scale_by_std=scale))
        torch.testing.assert_close(out.cpu(), loop_advantages(r.cpu(), ids.cpu(), 1e-4, scale))
    assert (out[ids == ids[0]] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_kernel_ignores_grad_and_casts_bf16(device):
    needs_kernel("group_advantages", device)
    r = mixed_rewards(4, 8).to(device)
    out = group_advantages(r.bfloat16().requires_grad_(), group_size=8)
    assert out.dtype == torch.float32 and not out.requires_grad
    torch.testing.assert_close(out, group_advantages_reference(r.bfloat16(), group_size=8))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    needs_kernel("group_advantages", device)
    r = mixed_rewards(5, 4).to(device)
    ids = (torch.arange(20) % 3).to(device)
    torch.library.opcheck(torch.ops.r1mega.group_advantages.default, (r, None, 4, 1e-6, True))
    torch.library.opcheck(torch.ops.r1mega.group_advantages.default, (r, ids, 0, 1e-6, False))


def test_bad_arguments():
    r = torch.zeros(10)
    with pytest.raises(ValueError, match="divide"):
        group_advantages(r, group_size=3)
    with pytest.raises(ValueError, match="exactly one"):
        group_advantages(r)
    with pytest.raises(ValueError, match="integer"):
        group_advantages(r, group_ids=torch.zeros(10))
