"""The policy the GRPO trainer optimises, whichever backend holds it.

`policy_for_backend(model_cfg, policy, dp)` turns the native policy `Transformer` into the module the optimizer
trains: the same model, FSDP2-sharded over the data-parallel ranks (`model.backend=native`), or a
megatron-core GPTModel holding its weights (`model.backend=megatron`: `MegatronPolicy`; the reference
model and the rollout engine keep native copies, so only the policy's forward, backward and optimizer
step run in megatron). Under torchrun the megatron policy is split by megatron's own tensor
parallelism over `parallel.tp` ranks (its parallel state built with the trainer's tp and data-parallel
groups, checked equal), and each tensor-parallel replica's gradients are summed over the
data-parallel group (r1mega.parallel.replicate: torch's DDP), the same global-batch gradient FSDP2
gives the native policy.

Beyond `nn.Module` (parameters, state dict, the forward the loss ops use), the trainer asks its policy
what `Policy` lists, and never which backend answers: the native model answers as a `NativePolicy`
(r1mega.parallel.native_policy; a pipelined one, `PipelinedModel`, with its own weight export and
load metrics, its stages holding other layers each), the megatron backend as `MegatronPolicy`.

Deliberately left out: sequence parallelism, without which megatron-core refuses to train MoE layers
under tensor parallelism (so tp > 1 runs dense models), megatron's expert and pipeline parallelism
under the trainer (parallel.ep and parallel.pp are refused with model.backend=megatron: the
expert-parallel weight loading and export do not split or gather megatron's experts yet, nor is
megatron's pipeline schedule driven), activation checkpointing of a megatron policy (refused:
r1mega's wraps native blocks), and megatron's DDP and distributed optimizer (replicate.py says why).
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
        if dp.dims.ep != 1:
            raise ValueError(f"model.backend=megatron under torchrun has no expert parallelism yet; parallel.ep="
                             f"{dp.dims.ep} is not supported with it: set it to 1, or use model.backend=native")
        if dp.dims.tp > 1 and policy.config.n_routed_experts:
            raise ValueError(f"parallel.tp={dp.dims.tp} with model.backend=megatron runs dense models only: "
                             "megatron-core trains MoE layers under tensor parallelism only with sequence "
                             "parallelism, which is not wired here yet; use parallel.tp=1 or model.backend=native")
        parallel = megatron.ParallelConfig(tensor_parallel=dp.dims.tp)
        built = megatron.MegatronPolicy.from_native(policy, parallel, dtype=next(policy.parameters()).dtype)
        _check_megatron_groups(dp)
        return replicate(built, dp.group, dp.device)
    raise ValueError(f"model.backend={model_cfg.backend!r}: expected 'native' or 'megatron'")


def _check_megatron_groups(dp) -> None:
    """megatron's tensor- and data-parallel groups must be the trainer's (both put tp innermost), or the
    vocabulary-parallel loss and the gradient sum would run over other ranks than the data's."""
    from megatron.core import parallel_state

    pairs = (("tensor", parallel_state.get_tensor_model_parallel_group(), dp.dims.mesh("tp").get_group()),
             ("data", parallel_state.get_data_parallel_group(), dp.group))
    for name, theirs, ours in pairs:
        if dist.get_process_group_ranks(theirs) != dist.get_process_group_ranks(ours):
            raise RuntimeError(f"megatron's {name}-parallel group {dist.get_process_group_ranks(theirs)} is not "
                               f"the trainer's {dist.get_process_group_ranks(ours)}")


def _world_of_one() -> None:
    """megatron-core needs a process group even for one process."""
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29533")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)
