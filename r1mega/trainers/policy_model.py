"""The policy the GRPO trainer optimises, whichever backend holds it.

`trainable(model_cfg, policy, dp)` turns the native policy `Transformer` into the module the optimizer
trains: the same model, FSDP2-sharded over the data-parallel ranks (`model.backend=native`), or a
megatron-core GPTModel holding its weights (`model.backend=megatron`: `MegatronPolicy`, on a GPU, in
one process; the reference model and the rollout engine keep native copies, so only the policy's
forward, backward and optimizer step run in megatron).

Beyond `nn.Module`, `output_weight` and the forward the loss ops use, the trainer needs a few things
of its policy; the functions below use a backend's method of the same name when it has one, the
native model's otherwise, so the trainer never asks which backend it has; `native_state_dict` serves
the reference reset.

Deliberately left out: megatron under torchrun (it would need megatron's DDP or distributed
optimizer in place of FSDP2).
"""

from __future__ import annotations

import os
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from r1mega.models import balance
from r1mega.parallel import gathered_state_dict


def trainable(model_cfg, policy: nn.Module, dp) -> nn.Module:
    if model_cfg.backend == "native":
        return dp.parallelize(policy)
    if model_cfg.backend == "megatron":
        if dp.distributed:
            raise ValueError("model.backend=megatron trains in one process (no megatron DDP yet); "
                             "launch without torchrun or use model.backend=native")
        from r1mega.backends import megatron

        _world_of_one()
        return megatron.MegatronPolicy.from_native(policy, dtype=next(policy.parameters()).dtype)
    raise ValueError(f"model.backend={model_cfg.backend!r}: expected 'native' or 'megatron'")


def _world_of_one() -> None:
    """megatron-core needs a process group even for one process."""
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)


def native_state_dict(policy: nn.Module) -> dict[str, torch.Tensor]:
    """The policy's state under native names, sharded as the native model's own would be (for the
    reference model, which stays native)."""
    own = getattr(policy, "engine_weights", None)
    return dict(own()) if own is not None else policy.state_dict()


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
