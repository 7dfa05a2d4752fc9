"""SGLang's rules for a request's sampling parameters, as the fake server of test_rollout_sglang.py applies
them; test_rollout_sglang_real.py checks them against SGLang's own SamplingParams."""

from __future__ import annotations

import math

SAMPLING_EPS = 1e-6  # SGLang's _SAMPLING_EPS: a lower temperature is greedy


def sglang_sampling_rules(sp: dict) -> dict:
    """What SGLang 0.5.23's SamplingParams makes of the sampling dict the adapter sends: __init__'s
    defaults (None -> temperature 1, top_p 1, top_k -1) and greedy rule (temperature below 1e-6 samples
    with top_k 1 at temperature 1), then verify()'s refusals, raised as ValueError. Checked against
    SGLang's own class in test_rollout_sglang_real.py."""
    t, top_p, top_k = (sp.get(k) for k in ("temperature", "top_p", "top_k"))
    t, top_p, top_k = (1.0 if t is None else t), (1.0 if top_p is None else top_p), (-1 if top_k is None else top_k)
    if 0 <= t < SAMPLING_EPS:
        t, top_k = 1.0, 1
    if not math.isfinite(t) or t < 0:
        raise ValueError(f"temperature must be a non-negative finite number, got {t}.")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}.")
    if top_k != -1 and top_k < 1:
        raise ValueError(f"top_k must be -1 (disable) or at least 1, got {top_k}.")
    if sp.get("max_new_tokens") is not None and sp["max_new_tokens"] < 0:
        raise ValueError(f"max_new_tokens must be at least 0, got {sp['max_new_tokens']}.")
    seed = sp.get("sampling_seed")
    if seed is not None and not isinstance(seed, int):
        raise ValueError(f"sampling_seed must be an integer, got {type(seed).__name__}.")
    if seed is not None and not -2**63 <= seed <= 2**63 - 1:
        raise ValueError(f"sampling_seed must be in [-2**63, 2**63 - 1], got {seed}.")
    return {"temperature": t, "top_p": top_p, "top_k": top_k, "sampling_seed": seed}
