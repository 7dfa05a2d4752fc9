"""Plain data parallelism for a module that FSDP2 does not shard: every rank holds the whole module
and the ranks' gradients are summed (the megatron backend's policy under torchrun).

`replicate(module, group)` wraps `module` in torch's `DistributedDataParallel` (CPU with gloo, GPUs
with nccl), with three choices that differ from DDP's defaults:
- gradients are all-reduced with SUM, not averaged (a comm hook): the trainer weights each rank's
  micro-batch losses by global counts, so the ranks' gradients add up to the global batch's, as
  FSDP2 is told to do (fsdp.sum_gradients);
- `broadcast_buffers=False`: rank 0's buffers do not overwrite the others' before each forward.
  megatron's routers count tokens per expert in buffers, each rank its own until the trainer sums
  them (MegatronPolicy.sum_expert_load); their expert biases stay equal without a broadcast, since
  every rank applies the same update to the same summed counts;
- gradient accumulation: DDP reduces what `.grad` holds at each backward, the earlier micro-batches'
  already-reduced gradients included, which a sum would count once per rank again. The caller runs
  every micro-batch but a step's last under `no_sync()`, so the gradients stay local until the last
  backward sums them all at once (policy_update.py).
Attributes the wrapped module has and DDP has not (a policy's `output_weight`, `engine_weights`,
...) are read through from it, so callers use the wrapper as they would the module. The gradients
that come out are the same on every rank: grad_clip counts their norm once, not once per rank.

Deliberately left out: megatron-core's own DistributedDataParallel and distributed optimizer (they
need CUDA, and their gradient buffers are reduce-scattered, which gloo cannot do), sharding the
optimizer state (each rank keeps a whole AdamW state), and overlap tuning (DDP's default buckets).
"""

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


# No `from __future__ import annotations` in this file: DDP checks the hook's annotations as objects.
def _sum_hook(group, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """All-reduces a bucket of gradients with SUM (DDP's default hook divides by the world size)."""
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class Replicated(DistributedDataParallel):
    """DDP whose unknown attributes are the wrapped module's."""

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "module":  # not yet set (during DDP's __init__): nothing to read through
                raise
            return getattr(self.module, name)


def replicate(module: nn.Module, group: dist.ProcessGroup | None = None,
              device: torch.device | None = None) -> Replicated:
    """`module` (already on `device`, the same weights on every rank) replicated over `group`,
    gradients summed."""
    cuda = device is not None and device.type == "cuda"
    ddp = Replicated(module, device_ids=[device] if cuda else None, process_group=group, broadcast_buffers=False)
    ddp.register_comm_hook(group, _sum_hook)
    return ddp
