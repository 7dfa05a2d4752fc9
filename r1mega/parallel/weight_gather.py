"""Stream a parallelized model's full (unsharded) weights, bucket by bucket, for weight sync.

`gathered_state_dict(model, bucket_bytes)` yields `(name, full tensor)` for every entry of the model's
state dict (parameters and persistent buffers such as the router's expert bias), with the names the
unparallelized model has. Sharded entries (DTensors from FSDP2, tensor parallel or expert parallel)
are gathered a bucket at a time: at most about `bucket_bytes` of gathered tensors exist at once, if
the consumer drops each bucket's tensors before asking for the next (the rollout engine copies them
in place). Every rank of the model's mesh must run the iterator to the end, in step: the gathers are
collectives.

Under pipeline parallelism each rank holds its stages only: `PipelinedModel.engine_weights`
(pipeline.py) runs this on each stage in turn and broadcasts the tensors over pp.

`load_full_state_dict(model, items)` is the way back: full tensors, the same on every rank, loaded into
a parallelized model, each rank cutting its own shards (a megatron policy's weights into the native
reference).

Deliberately left out: renaming to an engine's layout (r1mega/rollout/sync does that), and dtype
conversion.
"""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor


def _full_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()  # DTensor.numel() is the global size


def _gather(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def gathered_state_dict(model: nn.Module, bucket_bytes: int = 256 << 20) -> Iterator[tuple[str, torch.Tensor]]:
    """Yields (name, full tensor) in state-dict order, gathering one bucket of <= bucket_bytes at a time
    (a single tensor larger than the bucket is a bucket of its own)."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            nbytes = _full_bytes(tensor)
            if bucket and size + nbytes > bucket_bytes:
                yield from [(n, _gather(t)) for n, t in bucket]
                bucket, size = [], 0
            bucket.append((name, tensor))
            size += nbytes
        yield from [(n, _gather(t)) for n, t in bucket]


def load_full_state_dict(model: nn.Module, items: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Loads (name, full tensor) pairs, the same on every rank, into `model`: each entry sharded as the
    model's own (a DTensor's placements), or taken whole."""
    layout = model.state_dict()
    model.load_state_dict({name: _shard_like(layout.get(name), full) for name, full in items})


def _shard_like(target, full: torch.Tensor) -> torch.Tensor:
    if not isinstance(target, DTensor):
        return full
    # src_data_rank=None: every rank holds `full`, so no rank needs to send its piece
    return distribute_tensor(full.to(target.device), target.device_mesh, target.placements, src_data_rank=None)
