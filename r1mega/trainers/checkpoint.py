"""Training checkpoints that a kill can never leave half-written.

A checkpoint is a directory `step_<n>` holding `state.pt` (everything `torch.save` can hold: model,
reference model, optimizer, step and rollout counts, RNG states, data position, engine version). It is written
under a temporary name, flushed, then renamed (models.checkpoint.atomic_dir, the mechanism model
checkpoints use too); `latest` is a one-line file replaced atomically with
`os.replace`, so a reader sees either the old checkpoint or the new one. Older checkpoints beyond
`keep` are deleted only after the new one is in place.

Under data parallelism every rank calls `save` with a `shards` writer, a collective that writes what
each rank holds a piece of (the sharded policy, optimizer and reference, as torch.distributed.checkpoint
directories) into the same temporary directory; rank 0 writes `state.pt`, renames and publishes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from r1mega.models.checkpoint import atomic_dir

LATEST = "latest"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def _shared_atomic_dir(final: Path) -> Iterator[Path]:
    """atomic_dir, entered by rank 0 and its temporary directory shared with every rank; it replaces
    `final` once every rank has left the block."""
    if not dist.is_initialized():
        with atomic_dir(final, overwrite=True) as tmp:
            yield tmp
        return
    with atomic_dir(final, overwrite=True) if dist.get_rank() == 0 else contextlib.nullcontext() as tmp:
        shared = [tmp]
        dist.broadcast_object_list(shared, src=0)
        yield shared[0]
        dist.barrier()


def save(root: str | os.PathLike, step: int, state: dict[str, Any], *, keep: int = 2,
         shards: Callable[[Path], None] | None = None) -> Path:
    """Writes checkpoint `step` (see the module docstring for `shards`) and makes it the latest."""
    root = Path(root)
    final = root / f"step_{step}"
    main = not dist.is_initialized() or dist.get_rank() == 0
    with _shared_atomic_dir(final) as tmp:
        if shards is not None:
            shards(tmp)
        if main:
            with open(tmp / "state.pt", "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
    if main:
        pointer = root / f".{LATEST}.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / LATEST)
        _fsync_dir(root)
        for old in sorted(root.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))[:-keep]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()  # no rank reads `latest` or goes on before the checkpoint is published
    return final


def latest(root: str | os.PathLike) -> Path | None:
    pointer = Path(root) / LATEST
    if not pointer.exists():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not (path / "state.pt").exists():
        raise FileNotFoundError(f"{pointer} names {path}, which holds no state.pt")
    return path


def load(path: str | os.PathLike) -> dict[str, Any]:
    try:
        return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=False)
    except Exception as err:
        raise RuntimeError(f"cannot read checkpoint {path}: {err}") from err
