"""`NativePolicy`: the native `Transformer` (FSDP-sharded, tensor/expert-parallel or not) as the
trainer's `Policy` (r1mega/trainers/policy_model.py), and `as_native_policy` to make a built model one.

The methods are a mixin, not a wrapper: `as_native_policy` swaps the module's class for a subclass of
both (as FSDP2's `fully_shard` does), so parameter and state-dict names, the optimizer, checkpoints
and the forward see the same module as before. `PipelinedModel` (pipeline.py) is a `NativePolicy`
too, with its own weight export and load metrics (its stages hold other layers each).

The MoE layers' loads are theirs (`MoE.pending_load` and the methods beside it, moe.py); a policy only
asks them, sums them over ranks and has the bias step take them.

Deliberately left out: anything a backend other than the native model needs (megatron's policy
implements the protocol itself: r1mega/backends/megatron/policy.py).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from r1mega.models import balance
from r1mega.parallel.weight_gather import gathered_state_dict


class NativePolicy:
    """The Policy methods of an `nn.Module` whose MoE layers are r1mega.models.moe.MoE."""

    def engine_weights(self) -> Iterable[tuple[str, torch.Tensor]]:
        """Full weights under native names, bucket by bucket (a collective under data parallelism)."""
        return gathered_state_dict(self)

    def expert_load_stats(self) -> dict[str, float]:
        return balance.expert_load_stats(self)

    def update_expert_bias(self, rate: float) -> None:
        balance.update_expert_bias(self, rate)

    def sum_expert_load(self, group: dist.ProcessGroup | None) -> None:
        """Sums each MoE layer's load since the last bias update over the data-parallel `group` (None:
        one rank, nothing to add). Every rank ran the same number of training forwards, so every rank
        has a load to add, or none."""
        if group is None:
            return
        for _, moe in balance.moe_layers(self):
            moe.reduce_pending_load(lambda load: dist.all_reduce(load, group=group))

    def load_into_reference(self, reference: nn.Module) -> None:
        """The reference is the same model, sharded (and pipelined) alike: a state dict fits it."""
        reference.load_state_dict(self.state_dict())


def as_native_policy(model: nn.Module) -> NativePolicy:
    """`model` itself, its class now also a `NativePolicy` (module docstring)."""
    if not isinstance(model, NativePolicy):
        model.__class__ = type(f"NativePolicy{type(model).__name__}", (NativePolicy, type(model)), {})
    return model
