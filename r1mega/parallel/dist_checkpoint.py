"""Sharded, reshardable checkpoints with torch.distributed.checkpoint (DCP).

Every rank writes its own shards; the metadata records each tensor's global shape and where every
piece lives, so a checkpoint saved under one layout (say TP=2 x FSDP=2) loads under another,
including a single process with no process group (`load` on a plain `nn.Module`). Parameter names are
the unparallelized model's (FSDP2 and our activation checkpointing do not rename; DCP's state-dict
helpers strip wrapper prefixes anyway).

A save goes to `<path>.tmp` and is renamed to `<path>` by rank 0 once every rank has finished, so a
kill never leaves a half-written checkpoint under the final name.

Plain tensors that hold each rank's own piece (a megatron policy's tensor-parallel shards) are stored
under per-rank names (`_stored`): they load back at the same tensor-parallel size only.

Deliberately left out: asynchronous saves, and the trainer's own state (step, RNG, data position),
which r1mega/trainers/checkpoint.py keeps.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)


def _state(model: nn.Module, optimizer=None) -> dict:
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    return state


def _stored(state: dict, model: nn.Module) -> dict:
    """`state` as DCP stores it. Empty entries (megatron's linear layers' `_extra_state` is None) are
    left out: DCP writes nothing for them and would then miss them on load. A model whose plain tensors
    differ from rank to rank (megatron's tensor-parallel shards) names them by rank (`checkpoint_name`),
    or DCP would keep one rank's piece of each as if they were replicas. The tensors are the same
    objects, so a load into the result loads into `state`."""
    name = getattr(model, "checkpoint_name", lambda key: key)
    stored = {"model": {name(k): v for k, v in state["model"].items() if v is not None}}
    if "optim" in state:
        stored["optim"] = {**state["optim"], "state": {name(k): v for k, v in state["optim"]["state"].items()}}
    return stored


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(path: str | os.PathLike, model: nn.Module, optimizer=None) -> Path:
    """Collective: every rank of the model's mesh calls it with the same path."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
    _barrier()
    dcp.save(_stored(_state(model, optimizer), model), checkpoint_id=str(tmp))
    _barrier()
    if rank0:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    _barrier()
    return path


def load(path: str | os.PathLike, model: nn.Module, optimizer=None) -> None:
    """Loads into `model` (and `optimizer`) in their current layout, whatever layout saved them."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path}: not a torch.distributed.checkpoint directory (no .metadata)")
    state = _state(model, optimizer)
    dcp.load(_stored(state, model), checkpoint_id=str(path))
    # DCP found every stored entry it was asked for; the empty ones are not stored, so they are not
    # set, which a strict set refuses under a wrapper prefix (DDP's "module.").
    empty = [k for k, v in state["model"].items() if v is None]
    set_model_state_dict(model, {k: v for k, v in state["model"].items() if v is not None},
                         options=StateDictOptions(strict=not empty))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])
