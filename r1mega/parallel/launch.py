"""Start (and stop) the default process group from torchrun/slurm environment variables.

`init_distributed()` reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT (as torchrun and
tools/slurm set them), picks nccl when CUDA is present and gloo otherwise, and arms a watchdog so that
a dead rank ends every rank with an error that names it, instead of a silent hang:

- every rank bumps a heartbeat counter in the rendezvous store every `heartbeat_s`;
- rank r watches rank (r+1) % world only (a ring: O(world) store traffic, not O(world^2)); if that
  counter stops moving for `dead_after_s` and the rank did not say it finished, rank r records
  "rank k stopped answering" in the store;
- an uncaught exception records "rank r raised ..." (unless a peer's failure is already known or is
  found within `dead_after_s`: an error in a collective is usually the echo of a peer's death);
- every rank polls the record and exits with status 1, printing it; a rank that loses the store
  itself blames the store's host (rank 0, or torchrun's agent).
Under torchrun the agent also stops the surviving local workers and names the first failed rank; the
watchdog covers what it cannot see (ranks on other nodes, ranks stuck in a collective).

Deliberately left out: elastic restarts, and recovering from a failure (the run resumes from its last
checkpoint instead).
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

_FAILED = "failed"
_STORE_LOST = "rank 0 (host of the rendezvous store) is unreachable: {}"
_watchdog: "_Watchdog | None" = None


class _Watchdog:
    def __init__(self, store: dist.Store, rank: int, world: int, heartbeat_s: float, dead_after_s: float):
        self.store, self.rank, self.world = store, rank, world
        self.heartbeat_s, self.dead_after_s = heartbeat_s, dead_after_s
        self.stopping = threading.Event()
        self.host_done = False  # rank 0 finished normally: losing the store then is no failure
        self.peer = (rank + 1) % world
        self.store.add(f"hb/{rank}", 1)
        self.thread = threading.Thread(target=self._run, name="r1mega-watchdog", daemon=True)
        self.thread.start()

    def failure(self) -> str | None:
        if self.store.check([_FAILED]):
            return self.store.get(_FAILED).decode()
        return None

    def record(self, message: str) -> str:
        """Records `message` unless a failure is recorded already; returns the one that stands."""
        return self.store.compare_set(_FAILED, "", message).decode()

    def _peer_is_dead(self, last: list) -> bool:
        count = self.store.add(f"hb/{self.peer}", 0)  # read without changing it
        now = time.monotonic()
        if count != last[0]:
            last[0], last[1] = count, now
            return False
        return now - last[1] > self.dead_after_s and not self.store.check([f"done/{self.peer}"])

    def _run(self) -> None:
        last = [None, time.monotonic()]  # the peer's counter, and when it last moved
        while not self.stopping.wait(self.heartbeat_s):
            try:
                self.store.add(f"hb/{self.rank}", 1)
                if self.world > 1 and self._peer_is_dead(last):
                    self.record(f"rank {self.peer} stopped answering for {self.dead_after_s:.0f} s (died or hung)")
                message = self.failure()
                self.host_done = self.host_done or self.store.check(["done/0"])
            except Exception as exc:  # noqa: BLE001 - the store is gone: its host died
                if self.stopping.is_set() or self.host_done:
                    return
                message = _STORE_LOST.format(exc)
            if message is not None and not self.stopping.is_set():
                _exit_with(self.rank, message)

    def stop(self) -> None:
        self.stopping.set()
        try:
            self.store.set(f"done/{self.rank}", "1")
            finished = self.store.add("finished", 1)
            # Rank 0 may host the store: it stays until every rank is done or has had time to be.
            deadline = time.monotonic() + self.dead_after_s
            while self.rank == 0 and finished < self.world and time.monotonic() < deadline:
                time.sleep(0.1)
                finished = self.store.add("finished", 0)
        except Exception:  # noqa: BLE001 - the store may already be gone at shutdown
            pass


def _exit_with(rank: int, message: str) -> None:
    sys.stderr.write(f"[r1mega rank {rank}] stopping: {message}\n")
    sys.stderr.flush()
    os._exit(1)  # from any thread, even while the main thread is blocked in a collective


def _excepthook(exc_type, exc, tb) -> None:
    if _watchdog is None or exc_type is KeyboardInterrupt:
        sys.__excepthook__(exc_type, exc, tb)
        sys.exit(1)
    fail(exc)


def fail(exc: BaseException) -> None:
    """Ends this rank over `exc` as an uncaught exception does (module docstring): prints it, records the
    failure for every rank and exits 1. For code that catches exceptions before the hook would see them
    (Hydra's main turns them into sys.exit, after which peers would wait in a collective until timeout).
    Returns at once when no process group was started here."""
    wd = _watchdog
    if wd is None:
        return
    traceback.print_exception(exc)
    try:
        # A collective error is usually a peer's death seen early: give the watchdog time to name it.
        deadline = time.monotonic() + wd.dead_after_s + 2 * wd.heartbeat_s
        message = wd.failure()
        while message is None and time.monotonic() < deadline and _in_collective_error(exc):
            time.sleep(wd.heartbeat_s / 2)
            message = wd.failure()
        if message is None:
            message = wd.record(f"rank {wd.rank} raised {type(exc).__name__}: {exc}")
    except Exception as store_exc:  # noqa: BLE001 - the store is gone with its host
        message = _STORE_LOST.format(store_exc)
    _exit_with(wd.rank, message)


def _in_collective_error(exc: BaseException) -> bool:
    return isinstance(exc, (dist.DistError, RuntimeError)) and any(
        word in str(exc).lower() for word in ("gloo", "nccl", "connection", "timed out", "timeout", "peer")
    )


def init_distributed(*, timeout_s: float = 600.0, heartbeat_s: float = 2.0, dead_after_s: float = 20.0,
                     backend: str | None = None) -> tuple[int, int, torch.device]:
    """Initialises the default process group from the environment; returns (rank, world_size, device).

    A single process with no RANK/WORLD_SIZE set gets world size 1 without a process group.
    `timeout_s` bounds every collective; `dead_after_s` is how long a silent rank is given before
    every rank stops (a dead rank is named within dead_after_s + 2 * heartbeat_s).
    """
    global _watchdog
    if "WORLD_SIZE" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    store, rank, world = next(dist.rendezvous("env://", timeout=timedelta(seconds=timeout_s)))
    dist.init_process_group(backend, store=dist.PrefixStore("pg", store), rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    _watchdog = _Watchdog(dist.PrefixStore("r1mega_watchdog", store), rank, world, heartbeat_s, dead_after_s)
    sys.excepthook = _excepthook
    atexit.register(shutdown)
    return rank, world, device


def shutdown() -> None:
    """Marks this rank as finished (so peers do not think it died) and destroys the process group."""
    global _watchdog
    if _watchdog is not None:
        _watchdog.stop()
        _watchdog = None
    if dist.is_initialized():
        dist.destroy_process_group()
