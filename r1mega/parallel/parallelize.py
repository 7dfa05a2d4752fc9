"""`parallelize(model, dims, cfg)`: apply tensor, expert, activation checkpointing, compile and FSDP2
to a `Transformer`, in that order (torchtitan's), in place.

TP first because it turns parameters into DTensors on the tp mesh that FSDP then shards again on the
data-parallel mesh; EP next for the same reason on the ep mesh; checkpointing and compile wrap the
blocks' forwards before FSDP registers its hooks around them. `cfg` is an r1mega.config.ParallelConfig
(or anything with `activation_checkpointing`, optionally `compile`, `param_dtype`, `reduce_dtype`).
A world of one (no process group) gets checkpointing and compile only.

Deliberately left out: pipeline parallelism (pipeline.py splits the model into stages first and
calls this on each stage), context parallelism, and float8.
"""

from __future__ import annotations

from torch import nn

from r1mega.parallel.blocks import blocks
from r1mega.parallel.checkpointing import apply_activation_checkpointing
from r1mega.parallel.dims import ParallelDims
from r1mega.parallel.expert_parallel import ExpertParallel
from r1mega.parallel.fsdp import apply_fsdp, mixed_precision
from r1mega.parallel.tensor_parallel import apply_tensor_parallel

EXPERTS = "ffn.experts"  # the routed experts of an MoE block (r1mega.models.moe.Experts)


def expert_modules(model: nn.Module) -> list[nn.Module]:
    return [block.get_submodule(EXPERTS) for _, block in blocks(model) if hasattr(block.ffn, "experts")]


def apply_expert_parallel(model: nn.Module, dims: ParallelDims) -> nn.Module:
    tp_mesh = dims.mesh("tp") if dims.tp > 1 else None
    for experts in expert_modules(model):
        ExpertParallel(tp_mesh)._apply(experts, dims.mesh("ep"))
    return model


def parallelize(model: nn.Module, dims: ParallelDims, cfg) -> nn.Module:
    if dims.tp > 1:
        apply_tensor_parallel(model, dims.mesh("tp"))
    if dims.ep > 1:
        apply_expert_parallel(model, dims)
    apply_activation_checkpointing(model, getattr(cfg, "activation_checkpointing", "none"))
    if getattr(cfg, "compile", False):
        for _, block in blocks(model):
            block.compile()
    if dims.world_size > 1 and dims.fsdp_enabled:
        mp = mixed_precision(getattr(cfg, "param_dtype", "float32"), getattr(cfg, "reduce_dtype", "float32"))
        apply_fsdp(model, dims, mp, experts=expert_modules(model))
    return model
