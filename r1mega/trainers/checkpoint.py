"""Training checkpoints that a kill can never leave half-written.

A checkpoint is a directory `step_<n>` holding `state.pt` (everything `torch.save` can hold: model,
reference model, optimizer, scheduler, RNG states, data position, engine version). It is written
under a temporary name, flushed, then renamed (models.checkpoint.atomic_dir, the mechanism model
checkpoints use too); `latest` is a one-line file replaced atomically with
`os.replace`, so a reader sees either the old checkpoint or the new one. Older checkpoints beyond
`keep` are deleted only after the new one is in place.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch

from r1mega.models.checkpoint import atomic_dir

LATEST = "latest"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(root: str | os.PathLike, step: int, state: dict[str, Any], *, keep: int = 2) -> Path:
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step}"
    with atomic_dir(final, overwrite=True) as tmp, open(tmp / "state.pt", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    pointer = root / f".{LATEST}.tmp"
    pointer.write_text(final.name + "\n")
    os.replace(pointer, root / LATEST)
    _fsync_dir(root)
    for old in sorted(root.glob("step_*"), key=lambda p: int(p.name.split("_")[1]))[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
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
