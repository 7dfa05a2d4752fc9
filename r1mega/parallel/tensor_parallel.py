"""Tensor-parallel plans: plain dicts {submodule name: ParallelStyle}, one per block kind.

Megatron-style pairs inside each block: the projections that fan out to heads (or to the FFN's inner
dimension) are column-parallel, the projection that comes back to the hidden size is row-parallel, so
a block costs one all-reduce in attention and one in the FFN. Activations between blocks stay
replicated plain tensors (`use_local_output=True`), so modules outside the plan (norms, MLA's
low-rank `wq_a`/`wkv_a`, the router, and the routed experts when ep == 1) run unchanged on every tp
rank with identical inputs and gradients.

Because the model reshapes with its own head counts (`view(b, t, self.n_heads, ...)`), the plan's
`apply_tensor_parallel` sets each attention module's `n_heads` (and GQA's `n_kv`) to the local count.
MLA's rope key comes out of the replicated `wkv_a` and is shared by every head, so each tp rank only
sees the gradient of its own heads: a hook on `wkv_a` all-reduces the gradient of those columns over
tp (Megatron's "copy to tensor-parallel region"; the latent columns already get theirs reduced by the
column-parallel `wkv_b`).

Deliberately left out: sequence parallelism, and vocabulary-parallel embedding / output head (the
model applies its output matrix with `F.linear(h, self.output_weight)`, outside any module hook; see
the report), so the embedding and head stay replicated over tp and are sharded by FSDP only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from r1mega.parallel.blocks import blocks


def attention_plan(config) -> dict:
    if config.is_mla:
        q = "attn.wq" if config.q_lora_rank is None else "attn.wq_b"
        return {q: ColwiseParallel(), "attn.wkv_b": ColwiseParallel(), "attn.wo": RowwiseParallel()}
    return {"attn.wq": ColwiseParallel(), "attn.wk": ColwiseParallel(), "attn.wv": ColwiseParallel(),
            "attn.wo": RowwiseParallel()}


def ffn_plan(config, layer: int) -> dict:
    if not config.is_moe_layer(layer):
        return {"ffn.gate": ColwiseParallel(), "ffn.up": ColwiseParallel(), "ffn.down": RowwiseParallel()}
    if not config.n_shared_experts:
        return {}
    return {"ffn.shared.gate": ColwiseParallel(), "ffn.shared.up": ColwiseParallel(),
            "ffn.shared.down": RowwiseParallel()}


def block_plan(config, layer: int) -> dict:
    return {**attention_plan(config), **ffn_plan(config, layer)}


def check_divisible(config, tp: int) -> None:
    heads = config.num_attention_heads
    kv = heads if config.is_mla else config.num_key_value_heads
    if heads % tp or kv % tp:
        raise ValueError(f"tensor parallel: tp={tp} must divide num_attention_heads={heads} and the kv heads={kv}")
    for name in ("intermediate_size", "moe_intermediate_size"):
        if getattr(config, name) % tp:
            raise ValueError(f"tensor parallel: tp={tp} must divide {name}={getattr(config, name)}")


class _ReduceGradTail(torch.autograd.Function):
    """Identity forward; backward all-reduces the gradient of the last `width` columns over `group`."""

    @staticmethod
    def forward(ctx, x, width, group):
        ctx.width, ctx.group = width, group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        tail = grad[..., -ctx.width:].contiguous()
        dist.all_reduce(tail, group=ctx.group)
        grad[..., -ctx.width:] = tail
        return grad, None, None


def _reduce_rope_key_grad(attn: nn.Module, tp_mesh: DeviceMesh) -> None:
    width, group = attn.rope_dim, tp_mesh.get_group()
    attn.wkv_a.register_forward_hook(lambda module, args, out: _ReduceGradTail.apply(out, width, group))


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh) -> nn.Module:
    config, tp = model.config, tp_mesh.size()
    check_divisible(config, tp)
    for i, block in blocks(model):  # i: the global layer index (a pipeline stage holds a slice)
        parallelize_module(block, tp_mesh, block_plan(config, i))
        block.attn.n_heads //= tp  # the reshapes in attention.py now see local heads
        if hasattr(block.attn, "n_kv"):
            block.attn.n_kv //= tp
        if config.is_mla:
            _reduce_rope_key_grad(block.attn, tp_mesh)
    return model
