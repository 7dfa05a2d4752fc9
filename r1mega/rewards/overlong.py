"""DAPO's overlong reward shaping (Yu et al. 2025): a soft length penalty in the last `buffer` tokens of
the generation budget, added to a sample's reward, instead of the noise a truncated response's reward
would be.

    R_length(|y|) = 0                                   |y| <= L_max - L_cache
                    ((L_max - L_cache) - |y|) / L_cache  L_max - L_cache < |y| <= L_max
                    -1                                   |y| > L_max

L_max: the rollout's max_new_tokens, L_cache: the buffer in tokens; the trainer adds factor * R_length.
"""

from __future__ import annotations

import torch


def overlong_penalty(lengths: torch.Tensor, *, max_len: int, buffer: int, factor: float = 1.0) -> torch.Tensor:
    """factor * R_length [N] of the response lengths [N] (module docstring); float32."""
    if not 0 < buffer <= max_len:
        raise ValueError(f"overlong_penalty: the buffer ({buffer} tokens) must be in (0, max_len={max_len}]")
    lengths = lengths.double()
    soft = max_len - buffer
    penalty = torch.where(lengths > max_len, -1.0, ((soft - lengths) / buffer).clamp(max=0.0))
    return (factor * penalty).float()
