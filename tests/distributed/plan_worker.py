"""A gloo worker that trains the tiny model one AdamW step under a layout and records the bytes each rank
really holds (parameters, gradients, optimizer states), counted from the tensors' own storages, for
test_plan_shards.py to compare with what r1mega.plan predicts. Nothing of r1mega.plan runs here."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from r1mega.models.config import tiny_deepseek_v3
from r1mega.models.transformer import Transformer
from r1mega.parallel import ParallelDims, parallelize
from r1mega.parallel.fsdp import sum_gradients


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views of one buffer count once)."""
    seen = {}
    for t in tensors:
        s = _local(t).untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
    return sum(seen.values())


def measured_bytes(model, optimizer) -> dict[str, int]:
    params = list(model.parameters())
    moments = [state[key] for state in optimizer.state.values() for key in ("exp_avg", "exp_avg_sq")]
    steps = [state["step"] for state in optimizer.state.values()]
    return {"params": storage_bytes(params), "grads": storage_bytes(p.grad for p in params if p.grad is not None),
            "optimizer": storage_bytes(moments), "optimizer_host": storage_bytes(steps),
            "params_numel": sum(_local(p).numel() for p in params)}


def train_one_step(model, vocab: int, rows: int = 2, length: int = 16):
    ids = torch.randint(vocab, (rows, length + 1), generator=torch.Generator().manual_seed(0))
    logits = model(ids[:, :-1])
    F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()


def measure_layout(rank: int, world: int, dims_kw: dict, out_dir: str) -> None:
    torch.manual_seed(0)
    config = tiny_deepseek_v3()
    model = Transformer(config)
    if world > 1:
        dims = ParallelDims(world, **dims_kw)
        dims.build_mesh("cpu")
        sum_gradients(parallelize(model, dims, SimpleNamespace(activation_checkpointing="none")))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    train_one_step(model, config.vocab_size)
    optimizer.step()  # the states exist from the first step on; the gradients are still held
    rank = dist.get_rank() if dist.is_initialized() else 0
    with open(f"{out_dir}/rank{rank}.json", "w") as f:
        json.dump(measured_bytes(model, optimizer), f)


def measure_pipeline(rank: int, world: int, dims_kw: dict, out_dir: str) -> None:
    """The same, with the model cut into pipeline stages by pipeline_parallelize (1F1B) and one schedule
    run of forward and backward over two micro-batches."""
    from r1mega.parallel import pipeline_parallelize

    torch.manual_seed(0)
    config = tiny_deepseek_v3()
    dims = ParallelDims(world, **dims_kw)
    dims.build_mesh("cpu")
    pipe = pipeline_parallelize(Transformer(config), dims, SimpleNamespace(activation_checkpointing="none"))
    optimizer = torch.optim.AdamW(pipe.parameters(), lr=1e-3)
    ids = torch.randint(config.vocab_size, (4, 17), generator=torch.Generator().manual_seed(0))
    micro = ids.split(2)

    def head(targets):
        return lambda hidden, weight: (F.cross_entropy(F.linear(hidden, weight).flatten(0, 1), targets.flatten()), None)

    pipe.run_micro_batches([(m[:, :-1], {}) for m in micro], [head(m[:, 1:]) for m in micro], backward=True)
    optimizer.step()
    with open(f"{out_dir}/rank{dist.get_rank()}.json", "w") as f:
        json.dump(measured_bytes(pipe, optimizer), f)
