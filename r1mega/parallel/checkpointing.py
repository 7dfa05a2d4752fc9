"""Activation checkpointing of transformer blocks: "full" (recompute the whole block in backward) or
"selective" (keep the outputs of matmuls and attention, recompute the cheap elementwise ops, norms and
activations that hold most of the memory per FLOP).

The block's `forward` is wrapped in place rather than the block in a wrapper module, so parameter
names (and so checkpoints and weight sync) do not change.

Deliberately left out: checkpointing every n-th block only, and offloading saved activations to CPU.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from r1mega.parallel.blocks import blocks

MODES = ("none", "full", "selective")

# Ops whose outputs are worth keeping: recomputing them costs FLOPs, keeping them costs [T, H]-sized
# memory like any other activation.
_SAVE = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVE else CheckpointPolicy.PREFER_RECOMPUTE


def _checkpointed(forward, mode: str):
    context_fn = (functools.partial(create_selective_checkpoint_contexts, _policy) if mode == "selective"
                  else None)

    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return forward(*args, **kwargs)
        extra = {"context_fn": context_fn} if context_fn is not None else {}
        return checkpoint(forward, *args, use_reentrant=False, **extra, **kwargs)

    return run


def apply_activation_checkpointing(model: nn.Module, mode: str) -> nn.Module:
    """Checkpoints each block of `model.layers` in place; mode "none" leaves the model as it is."""
    if mode not in MODES:
        raise ValueError(f"activation_checkpointing={mode!r}: must be one of {MODES}")
    if mode == "none":
        return model
    for _, block in blocks(model):
        block.forward = _checkpointed(block.forward, mode)
    return model
