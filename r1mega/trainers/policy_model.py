"""The policy the GRPO trainer optimises, whichever backend holds it.

`policy_for_backend(model_cfg, policy, dp)` turns the native policy `Transformer` into the module the optimizer
trains: the same model, FSDP2-sharded over the data-parallel ranks (`model.backend=native`), or a
megatron-core GPTModel holding its weights (`model.backend=megatron`: `MegatronPolicy`; the reference
model and the rollout engine keep native copies, so only the policy's forward, backward and optimizer
step run in megatron). Under torchrun the megatron policy is replicated on every rank and its
gradients summed over the data-parallel group (r1mega.parallel.replicate: torch's DDP), the same
global-batch gradient FSDP2 gives the native policy; megatron's own parallel state then has tp = ep =
1 and a data-parallel group of the whole world, which nothing in its forward uses.

Beyond `nn.Module` (parameters, state dict, the forward the loss ops use), the trainer asks its policy
what `Policy` lists, and never which backend answers: the native model answers as a `NativePolicy`
(r1mega.parallel.native_policy; a pipelined one, `PipelinedModel`, with its own weight export and
load metrics, its stages holding other layers each), the megatron backend as `MegatronPolicy`.

Deliberately left out: megatron's tensor, expert and pipeline parallelism under the trainer
(parallel.tp, parallel.ep and parallel.pp are refused with model.backend=megatron: the rollout
engine's weight export and the expert-parallel weight loading do not gather or split megatron's
shards yet), activation
checkpointing of a megatron policy (refused: r1mega's wraps native blocks), and megatron's DDP and
distributed optimizer (replicate.py says why).
"""

from __future__ import annotations

import os
from typing import Iterable, Protocol

import torch
import torch.distributed as dist
from torch import nn

from r1mega.models.config import ModelConfig
from r1mega.parallel import as_native_policy
from r1mega.parallel.replicate import replicate


class Policy(Protocol):
    """What the GRPO trainer asks of the policy it optimises, beyond `nn.Module`."""

    config: ModelConfig

    @property
    def output_weight(self) -> torch.Tensor:
        """This rank's (vocabulary shard of the) output matrix, for the fused loss ops."""

    def engine_weights(self) -> Iterable[tuple[str, torch.Tensor]]:
        """Full weights under native names, for the rollout engine's `update_weights` (a collective)."""

    def expert_load_stats(self) -> dict[str, float]:
        """The MoE load metrics (r1mega.models.balance.load_stats) of the load the bias update acts on."""

    def sum_expert_load(self, group: dist.ProcessGroup | None) -> None:
        """Sums the MoE loads since the last bias update over the data-parallel `group` (None: one rank)."""

    def update_expert_bias(self, rate: float) -> None:
        """One aux-loss-free balancing step on the loads counted since the last one, which it resets."""

    def load_into_reference(self, reference: nn.Module) -> None:
        """The policy's weights into the native reference model (sharded as a native policy would be)."""


def policy_for_backend(model_cfg, policy: nn.Module, dp) -> Policy:
    """The native `policy` as the `Policy` of `model_cfg.backend`, parallelized as `dp` says."""
    if model_cfg.backend == "native":
        return as_native_policy(dp.parallelize(policy))
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
