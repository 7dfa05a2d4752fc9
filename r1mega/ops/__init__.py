"""Custom ops: one Python signature each, a plain-PyTorch reference, and C++/CUDA kernels from csrc/
registered with torch.library (autograd, fake tensors, torch.compile). `r1mega-info` shows which
implementation each op runs on each device."""

from r1mega.ops.group_advantages import group_advantages
from r1mega.ops.grpo_loss import grpo_loss
from r1mega.ops.linear_grpo_loss import linear_grpo_loss
from r1mega.ops.linear_logprob import linear_logprob
from r1mega.ops.moe import moe_permute, moe_route, moe_unpermute

__all__ = ["group_advantages", "grpo_loss", "linear_grpo_loss", "linear_logprob", "moe_permute", "moe_route",
           "moe_unpermute"]
