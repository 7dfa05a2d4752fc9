"""A worker for test_launch.py: init via r1mega.parallel.launch, then rank `victim` fails while the others
sit in collectives. argv: mode ("kill", "raise" or "ok") and victim rank."""

import os
import signal
import sys
import time

import torch
import torch.distributed as dist

from r1mega.parallel.launch import init_distributed

mode, victim = sys.argv[1], int(sys.argv[2])
rank, world, _ = init_distributed(heartbeat_s=0.5, dead_after_s=5.0)
x = torch.ones(4)
dist.all_reduce(x)  # everyone is up
for step in range(200):
    if rank == victim and step == 3:
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "raise":
            raise ValueError("boom from the victim")
    dist.all_reduce(x)
    time.sleep(0.01)
    if mode == "ok" and step == 20:
        break
print(f"rank {rank} finished", flush=True)
