"""FSDP2 (`fully_shard`) over the data-parallel mesh, one unit per transformer block.

Each `model.layers[i]` becomes an FSDP unit (its parameters gathered just before its forward and
freed after), then the root takes what is left (embedding, final norm, output head). With expert
parallelism the routed experts of a block are their own unit on the smaller `efsdp` mesh: their
parameters are already split over `ep`, and sharding them again over the full data-parallel group
would cross the ep dimension. With dp_replicate > 1 the mesh is 2-D and FSDP2 does HSDP.

Deliberately left out: CPU offload, and any reshard policy other than "after forward except the last
unit" (the root's parameters stay gathered for the backward that follows at once).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from r1mega.parallel.blocks import blocks as model_blocks
from r1mega.parallel.dims import ParallelDims

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def mixed_precision(param_dtype: str = "float32", reduce_dtype: str = "float32") -> MixedPrecisionPolicy:
    """Parameters cast to `param_dtype` for compute; gradients reduced in `reduce_dtype` (fp32 keeps
    the sum of many ranks' gradients exact enough)."""
    return MixedPrecisionPolicy(param_dtype=_DTYPES[param_dtype], reduce_dtype=_DTYPES[reduce_dtype])


def apply_fsdp(model: nn.Module, dims: ParallelDims, mp: MixedPrecisionPolicy | None = None,
               experts: list[nn.Module] = ()) -> nn.Module:
    """Shards `model` in place; `experts` are the routed-experts modules (own units when ep > 1)."""
    mp = mp or mixed_precision()
    dense_mesh = dims.mesh(*dims.dense_fsdp_dims)
    expert_ids = {id(m) for m in experts} if dims.ep > 1 else set()
    blocks = [block for _, block in model_blocks(model)]
    for i, block in enumerate(blocks):
        for module in block.modules():
            if id(module) in expert_ids:
                fully_shard(module, mesh=dims.mesh(*dims.expert_fsdp_dims), mp_policy=mp)
                # Expert gradients come from every data-parallel rank's tokens (through the all_to_all)
                # but are reduced over the smaller efsdp group only: divide by the full dp degree, as
                # the dense gradients are, so both are means over the global batch.
                module.set_gradient_divide_factor(float(dims.dp_replicate * dims.dp_shard * dims.cp))
        # The last block's parameters are needed first in backward: keep them gathered.
        fully_shard(block, mesh=dense_mesh, mp_policy=mp, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mesh=dense_mesh, mp_policy=mp, reshard_after_forward=False)
    return model


def sum_gradients(model: nn.Module) -> nn.Module:
    """Makes every FSDP unit of `model` reduce gradients by a plain sum over its mesh, instead of the
    mean (and the experts' divisor above): for a loss that each rank has already normalised by global
    counts, so that the ranks' gradients add up to the global batch's. Sum-only collectives, no
    PREMUL_SUM or AVG, which gloo lacks."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return model
