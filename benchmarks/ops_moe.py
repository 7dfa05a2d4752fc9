"""Benchmark cases for the MoE routing ops: `moe_route`, `moe_permute`, `moe_unpermute`.

The headline case, `moe_route+permute`, is one MoE layer's dispatch at 65,536 tokens, 64 experts,
top-6 of 8 groups (4 kept), hidden size 1024 in bf16: what the issue's >= 2x target is about. The
reference column is the plain-PyTorch meaning of each op (r1mega/ops/moe_*.py), the kernel column the
public function, which runs the compiled kernel when r1mega._C has one for the device (otherwise both
columns run the reference). Forward only, except the `_fwd_bwd` rows.
Deliberately left out: the expert GEMMs and the all_to_all (not these ops' work).
"""

from __future__ import annotations

import torch

from harness import Case
from r1mega.ops.moe import (
    moe_permute,
    moe_permute_reference,
    moe_route,
    moe_route_reference,
    moe_unpermute,
    moe_unpermute_reference,
)

TOKENS, EXPERTS, TOP_K, N_GROUP, TOPK_GROUP, HIDDEN = 65_536, 64, 6, 8, 4, 1024


def _route_inputs(device: str, n_experts: int):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(TOKENS, n_experts, generator=gen).to(device)
    bias = (0.1 * torch.randn(n_experts, generator=gen)).to(device)
    return logits, bias


def _route_case(device: str, n_experts: int, top_k: int) -> Case:
    kw = dict(top_k=top_k, n_group=N_GROUP, topk_group=TOPK_GROUP, scaling=2.5)

    def setup():
        logits, bias = _route_inputs(device, n_experts)
        return (lambda: moe_route_reference(logits, bias, **kw)), (lambda: moe_route(logits, bias, **kw))

    return Case("moe_route", f"{TOKENS}x{n_experts} top{top_k} g{N_GROUP}/{TOPK_GROUP}", setup, device)


def _route_backward_case(device: str) -> Case:
    kw = dict(top_k=TOP_K, n_group=N_GROUP, topk_group=TOPK_GROUP, scaling=2.5)

    def setup():
        logits, bias = _route_inputs(device, EXPERTS)
        logits.requires_grad_()
        grad = torch.randn(TOKENS, TOP_K, device=device)

        def run(route):
            weights, _ = route(logits, bias, **kw)
            return torch.autograd.grad(weights, logits, grad)

        return (lambda: run(moe_route_reference)), (lambda: run(moe_route))

    return Case("moe_route_fwd_bwd", f"{TOKENS}x{EXPERTS} top{TOP_K} g{N_GROUP}/{TOPK_GROUP}", setup, device)


def _permute_inputs(device: str):
    logits, bias = _route_inputs(device, EXPERTS)
    _, indices = moe_route_reference(logits, bias, top_k=TOP_K, n_group=N_GROUP, topk_group=TOPK_GROUP)
    x = torch.randn(TOKENS, HIDDEN, device=device, dtype=torch.bfloat16)
    return logits, bias, indices, x


def _permute_bytes() -> int:
    return TOKENS * HIDDEN * 2 * (1 + TOP_K)  # read x once, write k copies (bf16)


def cases(device: str) -> list[Case]:
    shape = f"{TOKENS}x{EXPERTS} top{TOP_K} g{N_GROUP}/{TOPK_GROUP} H{HIDDEN} bf16"
    kw = dict(top_k=TOP_K, n_group=N_GROUP, topk_group=TOPK_GROUP, scaling=2.5)

    def route_permute_setup():
        logits, bias, _, x = _permute_inputs(device)

        def run(route, permute):
            _, indices = route(logits, bias, **kw)
            return permute(x, indices, EXPERTS)

        return (lambda: run(moe_route_reference, moe_permute_reference)), (lambda: run(moe_route, moe_permute))

    def permute_setup():
        _, _, indices, x = _permute_inputs(device)
        return (lambda: moe_permute_reference(x, indices, EXPERTS)), (lambda: moe_permute(x, indices, EXPERTS))

    def unpermute_setup():
        logits, bias, indices, x = _permute_inputs(device)
        weights, _ = moe_route_reference(logits, bias, **kw)
        y_sorted, _, row_map = moe_permute_reference(x, indices, EXPERTS)
        return (
            (lambda: moe_unpermute_reference(y_sorted, row_map, weights)),
            (lambda: moe_unpermute(y_sorted, row_map, weights)),
        )

    rows = [
        Case("moe_route+permute", shape, route_permute_setup, device, target=">= 2x on CPU", bytes_moved=_permute_bytes()),
        _route_case(device, EXPERTS, TOP_K),
        _route_backward_case(device),
        Case("moe_permute", shape, permute_setup, device, bytes_moved=_permute_bytes()),
        Case("moe_unpermute", shape, unpermute_setup, device, bytes_moved=_permute_bytes()),
    ]
    if device == "cuda":  # DeepSeek-V3's router: 256 experts, top-8
        rows.append(_route_case(device, 256, 8))
    return rows
