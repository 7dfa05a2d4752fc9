"""Benchmark cases for the MoE routing ops: `moe_route`, `moe_permute`, `moe_unpermute`.

The headline case, `moe_route+permute`, is one MoE layer's dispatch at 65,536 tokens, 64 experts,
top-6 of 8 groups (4 kept), hidden size 1024 in bf16: what the issue's >= 2x target is about. The
reference column is the plain-PyTorch meaning of each op (r1mega/ops/moe_*.py), the kernel column the
public function, which runs the compiled kernel when r1mega._C has one for the device (otherwise both
columns run the reference). Forward only, except the `_fwd_bwd` rows. `toy`: 512 tokens, 16 experts,
top-4 of 4 groups (2 kept), H=64, to check that the benchmark runs.
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

SIZES = {  # (tokens, experts, top-k, groups, groups kept, hidden size)
    "full": (65_536, 64, 6, 8, 4, 1024),
    "toy": (512, 16, 4, 4, 2, 64),
}


def _route_inputs(device: str, tokens: int, n_experts: int):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(tokens, n_experts, generator=gen).to(device)
    bias = (0.1 * torch.randn(n_experts, generator=gen)).to(device)
    return logits, bias


def _route_case(device: str, size: str, n_experts: int, top_k: int) -> Case:
    tokens, _, _, n_group, topk_group, _ = SIZES[size]
    kw = dict(top_k=top_k, n_group=n_group, topk_group=topk_group, scaling=2.5)

    def setup():
        logits, bias = _route_inputs(device, tokens, n_experts)
        return (lambda: moe_route_reference(logits, bias, **kw)), (lambda: moe_route(logits, bias, **kw))

    return Case("moe_route", f"{tokens}x{n_experts} top{top_k} g{n_group}/{topk_group}", setup, device)


def _route_backward_case(device: str, size: str) -> Case:
    tokens, experts, top_k, n_group, topk_group, _ = SIZES[size]
    kw = dict(top_k=top_k, n_group=n_group, topk_group=topk_group, scaling=2.5)

    def setup():
        logits, bias = _route_inputs(device, tokens, experts)
        logits.requires_grad_()
        grad = torch.randn(tokens, top_k, device=device)

        def run(route):
            weights, _ = route(logits, bias, **kw)
            return torch.autograd.grad(weights, logits, grad)

        return (lambda: run(moe_route_reference)), (lambda: run(moe_route))

    return Case("moe_route_fwd_bwd", f"{tokens}x{experts} top{top_k} g{n_group}/{topk_group}", setup, device)


def _permute_inputs(device: str, size: str):
    tokens, experts, top_k, n_group, topk_group, hidden = SIZES[size]
    logits, bias = _route_inputs(device, tokens, experts)
    _, indices = moe_route_reference(logits, bias, top_k=top_k, n_group=n_group, topk_group=topk_group)
    x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16)
    return logits, bias, indices, x


def cases(device: str, toy: bool = False) -> list[Case]:
    size = "toy" if toy else "full"
    tokens, experts, top_k, n_group, topk_group, hidden = SIZES[size]
    shape = f"{tokens}x{experts} top{top_k} g{n_group}/{topk_group} H{hidden} bf16"
    kw = dict(top_k=top_k, n_group=n_group, topk_group=topk_group, scaling=2.5)
    permute_bytes = tokens * hidden * 2 * (1 + top_k)  # read x once, write k copies (bf16)

    def route_permute_setup():
        logits, bias, _, x = _permute_inputs(device, size)

        def run(route, permute):
            _, indices = route(logits, bias, **kw)
            return permute(x, indices, experts)

        return (lambda: run(moe_route_reference, moe_permute_reference)), (lambda: run(moe_route, moe_permute))

    def permute_setup():
        _, _, indices, x = _permute_inputs(device, size)
        return (lambda: moe_permute_reference(x, indices, experts)), (lambda: moe_permute(x, indices, experts))

    def unpermute_setup():
        logits, bias, indices, x = _permute_inputs(device, size)
        weights, _ = moe_route_reference(logits, bias, **kw)
        y_sorted, _, row_map = moe_permute_reference(x, indices, experts)
        return (
            (lambda: moe_unpermute_reference(y_sorted, row_map, weights)),
            (lambda: moe_unpermute(y_sorted, row_map, weights)),
        )

    rows = [
        Case("moe_route+permute", shape, route_permute_setup, device, target=">= 2x on CPU" if not toy else None,
             bytes_moved=permute_bytes),
        _route_case(device, size, experts, top_k),
        _route_backward_case(device, size),
        Case("moe_permute", shape, permute_setup, device, bytes_moved=permute_bytes),
        Case("moe_unpermute", shape, unpermute_setup, device, bytes_moved=permute_bytes),
    ]
    if device == "cuda" and not toy:  # DeepSeek-V3's router: 256 experts, top-8
        rows.append(_route_case(device, size, 256, 8))
    return rows
