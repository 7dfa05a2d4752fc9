"""RMSNorm as the Hugging Face models compute it: normalise in fp32, cast back, then scale.

Deliberately left out: a fused kernel; `torch.compile` fuses this well enough.
"""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        # The cast comes before the scale, as in transformers, so bf16 results match it bit for bit.
        return self.weight * x.to(dtype)
