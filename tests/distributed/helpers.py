"""Helpers for the gloo tests: free ports and running a function on `world` CPU processes."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)  # several ranks share 2 cores: avoid oversubscription
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
        # No rank tears its gloo pair down while a peer's last collective is still in flight (a rank that
        # did so was seen to abort: "terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_world(fn, world: int, *args) -> None:
    """Runs fn(rank, world, *args) on `world` gloo processes; a failure in any of them fails the caller."""
    mp.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)
