"""`group_advantages`: per-sample rewards -> GRPO advantages, normalised within each group.

    A_i = (r_i - mean_g) / (std_g + eps)      (scale_by_std=True, the paper's formula)
    A_i =  r_i - mean_g                        (scale_by_std=False, Dr. GRPO)

over the samples i of group g. std is the sample standard deviation (unbiased, n - 1 in the
denominator), as `torch.std`, TRL and verl use. A group whose rewards are all equal gives exactly 0
(tested by equality, not by a small std, so rounding in the mean cannot leak through), and so does a
group of one sample. Groups are either `group_size` consecutive samples (N must be a multiple of it)
or given by integer `group_ids` [N]: groups may then have different sizes, and the ids need not be
sorted or contiguous. Statistics are computed in fp64; the result has the dtype of `rewards`
(float32 or float64; other dtypes are computed as float32).

No autograd: rewards carry no gradient. Deliberately left out: leave-one-out baselines (RLOO),
batch-level std (REINFORCE++), reward clipping.
"""

from __future__ import annotations

import torch

from r1mega.ops import _extension


def _check(rewards: torch.Tensor, group_size: int | None, group_ids: torch.Tensor | None) -> None:
    if rewards.dim() != 1:
        raise ValueError(f"group_advantages: rewards must be [N], got shape {tuple(rewards.shape)}")
    if (group_size is None) == (group_ids is None):
        raise ValueError("group_advantages: give exactly one of group_size and group_ids")
    if group_size is not None and (group_size < 1 or rewards.numel() % group_size):
        raise ValueError(f"group_advantages: group_size={group_size} must be >= 1 and divide N={rewards.numel()}")
    if group_ids is not None and (group_ids.shape != rewards.shape or group_ids.is_floating_point()):
        raise ValueError(f"group_advantages: group_ids must be integer [N]={tuple(rewards.shape)}, "
                         f"got {group_ids.dtype} {tuple(group_ids.shape)}")


def _float(rewards: torch.Tensor) -> torch.Tensor:
    return rewards if rewards.dtype in (torch.float32, torch.float64) else rewards.float()


def group_advantages_reference(
    rewards: torch.Tensor,
    *,
    group_size: int | None = None,
    group_ids: torch.Tensor | None = None,
    eps: float = 1e-6,
    scale_by_std: bool = True,
) -> torch.Tensor:
    """Plain-PyTorch meaning of `group_advantages`."""
    _check(rewards, group_size, group_ids)
    rewards = _float(rewards)
    r = rewards.double()  # [N]
    if group_size is not None:
        grouped = r.view(-1, group_size)  # [G, n]
        mean = grouped.mean(1, keepdim=True)
        std = grouped.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
        equal = grouped.amax(1, keepdim=True) == grouped.amin(1, keepdim=True)
        adv = grouped - mean if not scale_by_std else (grouped - mean) / (std + eps)
        return torch.where(equal, 0.0, adv).view(-1).to(rewards.dtype)
    _, index, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)  # [N], [G]
    n = counts.double()
    mean = torch.zeros_like(n).index_add_(0, index, r) / n  # [G]
    centred = r - mean[index]  # [N]
    var = torch.zeros_like(n).index_add_(0, index, centred * centred) / (n - 1).clamp(min=1)
    high = torch.full_like(n, -torch.inf).scatter_reduce_(0, index, r, "amax")
    low = torch.full_like(n, torch.inf).scatter_reduce_(0, index, r, "amin")
    adv = centred / (var.sqrt()[index] + eps) if scale_by_std else centred
    return torch.where((high == low)[index], 0.0, adv).to(rewards.dtype)


if hasattr(torch.ops.r1mega, "group_advantages"):  # the compiled library defines the schema

    @torch.library.register_fake("r1mega::group_advantages")
    def _group_advantages_fake(rewards, group_ids, group_size, eps, scale_by_std):
        return torch.empty_like(rewards)


def group_advantages(
    rewards: torch.Tensor,
    *,
    group_size: int | None = None,
    group_ids: torch.Tensor | None = None,
    eps: float = 1e-6,
    scale_by_std: bool = True,
) -> torch.Tensor:
    """Advantages [N] for rewards [N], by the module docstring's formula; no gradient."""
    _check(rewards, group_size, group_ids)
    if not _extension.has_kernel("group_advantages", rewards.device):
        return group_advantages_reference(rewards, group_size=group_size, group_ids=group_ids, eps=eps,
                                          scale_by_std=scale_by_std)
    return torch.ops.r1mega.group_advantages(_float(rewards).detach(), group_ids, group_size or 0, float(eps),
                                             bool(scale_by_std))
