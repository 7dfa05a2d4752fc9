"""The policy the GRPO trainer optimises, whichever backend holds it.

`trainable(model_cfg, policy, dp)` turns the native policy `Transformer` into the module the optimizer
trains: the same model, FSDP2-sharded over the data-parallel ranks (`model.backend=native`), or a
megatron-core GPTModel holding its weights (`model.backend=megatron`: `MegatronPolicy`; the reference
model and the rollout engine keep native copies, so only the policy's forward, backward and optimizer
step run in megatron). Under torchrun the megatron policy is replicated on every rank and its
gradients summed over the data-parallel group (r1mega.parallel.replicate: torch's DDP), the same
global-batch gradient FSDP2 gives the native policy; megatron's own parallel state then has tp = ep =
1 and a data-parallel group of the whole world, which nothing in its forward uses.

Beyond `nn.Module`, `output_weight` and the forward the loss ops use, the trainer needs a few things
of its policy; the functions below use a backend's method of the same name when it has one, the
native model's otherwise, so the trainer never asks which backend it has; `reset_reference` loads the
policy's weights into the native reference.

A pipelined native policy (r1mega.parallel.pipeline.PipelinedModel) brings its own `engine_weights` and
`expert_load_stats` (its stages hold other layers each); its reference is pipelined alike, so
`reset_reference` loads it by state dict, stage by stage.

Deliberately left out: megatron's tensor, expert and pipeline parallelism under the trainer
(parallel.tp, parallel.ep and parallel.pp are refused with model.backend=megatron: the rollout
engine's weight export and the expert-parallel weight loading do not gather or split megatron's
shards yet), activation
checkpointing of a megatron policy (refused: r1mega's wraps native blocks), and megatron's DDP and
distributed optimizer (replicate.py says why).
"""

from __future__ import annotations

import os
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from r1mega.models import balance
from r1mega.parallel import gathered_state_dict
from r1mega.parallel.replicate import replicate


def trainable(model_cfg, policy: nn.Module, dp) -> nn.Module:
    if model_cfg.backend == "native":
        return dp.parallelize(policy)
    if model_cfg.backend == "megatron":
        from r1mega.backends import megatron

        checkpointing = dp.parallel_cfg.activation_checkpointing if dp.parallel_cfg is not None else "none"
        if checkpointing != "none":
            raise ValueError(f"parallel.activation_checkpointing={checkpointing!r} is not applied to a megatron "
                             "policy: set it to 'none', or use model.backend=native")
        if not dp.distributed:
            _world_of_one()
            return megatron.MegatronPolicy.from_native(policy, dtype=next(policy.parameters()).dtype)
        split = {key: getattr(dp.dims, key) for key in ("tp", "ep") if getattr(dp.dims, key) != 1}
        if split:
            raise ValueError(f"model.backend=megatron under torchrun is data parallel only; "
                             f"{', '.join(f'parallel.{k}={v}' for k, v in split.items())} is not supported "
                             "with it: set it to 1, or use model.backend=native")
        return replicate(megatron.MegatronPolicy.from_native(policy, dtype=next(policy.parameters()).dtype),
                         dp.group, dp.device)
    raise ValueError(f"model.backend={model_cfg.backend!r}: expected 'native' or 'megatron'")


def _world_of_one() -> None:
    """megatron-core needs a process group even for one process."""
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)


def reset_reference(reference: nn.Module, policy: nn.Module) -> None:
    """Loads the policy's weights into the reference model (native, sharded over the data-parallel
    ranks under torchrun as a native policy would be)."""
    own = getattr(policy, "engine_weights", None)
    if own is None or type(policy) is type(reference):
        reference.load_state_dict(policy.state_dict())  # the same model, sharded (and pipelined) alike
        return
    # Whole tensors under native names, the same on every rank: each rank cuts its own shards.
    layout = reference.state_dict()
    reference.load_state_dict({name: _as(layout.get(name), t) for name, t in own()})


def _as(target, full: torch.Tensor) -> torch.Tensor:
    """`full` sharded as `target` is (a DTensor), or `full` itself."""
    if not isinstance(target, DTensor):
        return full
    # src_data_rank=None: every rank holds `full`, so no rank needs to send its piece
    return distribute_tensor(full.to(target.device), target.device_mesh, target.placements, src_data_rank=None)


def engine_weights(policy: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """Full weights under native names, bucket by bucket (a collective under data parallelism)."""
    own = getattr(policy, "engine_weights", None)
    return own() if own is not None else gathered_state_dict(policy)


def expert_load_stats(policy: nn.Module) -> dict[str, float]:
    own = getattr(policy, "expert_load_stats", None)
    return own() if own is not None else balance.expert_load_stats(policy)


def update_expert_bias(policy: nn.Module, rate: float) -> None:
    own = getattr(policy, "update_expert_bias", None)
    return own(rate) if own is not None else balance.update_expert_bias(policy, rate)
