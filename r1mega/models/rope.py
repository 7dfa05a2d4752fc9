"""Rotary position embeddings: the inverse frequencies of each scaling rule and their application.

Frequencies are recomputed from the config on every forward (D/2 numbers): no buffer, so a model
built on the meta device needs nothing re-initialised. Rules: default, linear, llama3, and YaRN with
the attention factor (mscale) as transformers and DeepSeek-V3 define it. Two layouts of the rotated
dimensions: halves (x[:D/2], x[D/2:]) as Llama/Qwen, and interleaved pairs (x0, x1), (x2, x3)... as
DeepSeek-V3 checkpoints; the interleaved one outputs the de-interleaved result, as transformers does,
which is fine because q and k go through the same permutation.

Deliberately left out: dynamic NTK, longrope, partial rotary factors.
"""

from __future__ import annotations

import math

import torch


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def inv_freq(config, device=None) -> tuple[torch.Tensor, float]:
    """Returns (inverse frequencies [D/2] fp32, attention factor applied to cos and sin)."""
    dim, base = config.rope_dim, config.rope_theta
    freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))  # [D/2]
    rs = config.rope_scaling
    if rs is None:
        return freq, 1.0
    kind = rs["rope_type"]
    if kind == "linear":
        return freq / rs["factor"], 1.0
    if kind == "llama3":
        factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
        old_len = rs["original_max_position_embeddings"]
        wavelen = 2 * math.pi / freq
        scaled = torch.where(wavelen > old_len / low, freq / factor, freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled), 1.0
    # YaRN: interpolate low frequencies, keep high ones, ramp in between.
    old_len = rs.get("original_max_position_embeddings") or config.max_position_embeddings
    factor = rs.get("factor") or config.max_position_embeddings / old_len
    attention_factor = rs.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rs.get("mscale"), rs.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoids a division by zero in the ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float, device=device) - low) / (high - low)).clamp(0, 1)
    extrapolation = 1 - ramp  # 1 keeps the original frequency
    return (freq / factor) * (1 - extrapolation) + freq * extrapolation, float(attention_factor)


def softmax_scale(config) -> float:
    """1/sqrt(qk head dim), times DeepSeek-V3's YaRN mscale(factor, mscale_all_dim)^2 for MLA."""
    scale = config.qk_head_dim ** -0.5
    rs = config.rope_scaling
    if config.is_mla and rs is not None and rs.get("mscale_all_dim"):
        scale *= _yarn_mscale(rs["factor"], rs["mscale_all_dim"]) ** 2
    return scale


def cos_sin(config, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [B, T, D/2] for position_ids [B, T], in `dtype` (computed in fp32, as transformers)."""
    freq, attention_factor = inv_freq(config, position_ids.device)
    angles = position_ids[..., None].float() * freq  # [B, T, D/2]
    return (angles.cos() * attention_factor).to(dtype), (angles.sin() * attention_factor).to(dtype)


def apply(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool) -> torch.Tensor:
    """Rotates x [B, T, heads, D] by cos, sin [B, T, D/2]."""
    cos, sin = cos[:, :, None], sin[:, :, None]  # [B, T, 1, D/2]
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
