"""Runs a command in its own time box: its output teed to the console and a log as it comes, its last
lines kept, and the whole process group killed when the box ends (a benchmark's workers included), so
that one hung part cannot hold a GPU lease past its share. Used by gpu_check.py."""

from __future__ import annotations

import collections
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from typing import IO


@dataclasses.dataclass
class Finished:
    argv: list[str]
    rc: int | None  # None: killed at the end of its box
    seconds: float
    timed_out: bool
    tail: str  # the last lines it printed (stdout and stderr together)

    def as_dict(self) -> dict:
        return {"command": " ".join(self.argv), "rc": self.rc, "seconds": round(self.seconds, 2),
                "timed_out": self.timed_out}


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # already gone
        pass


def run(argv: list[str], timeout: float, *, cwd, env: dict, log: IO[str], tail_lines: int = 60) -> Finished:
    """Runs `argv` for at most `timeout` seconds; never raises for the command's own failure."""
    log.write(f"\n$ {' '.join(argv)}   (time box {timeout:.0f} s)\n")
    log.flush()
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)  # its own group: killpg reaches its children
    tail = collections.deque(maxlen=tail_lines)

    def tee() -> None:
        for line in proc.stdout:
            sys.stdout.write(line)
            log.write(line)
            tail.append(line)
        sys.stdout.flush()
        log.flush()

    reader = threading.Thread(target=tee, daemon=True)
    reader.start()
    timed_out = False
    try:
        proc.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        timed_out = True
    _kill_group(proc.pid)  # at the end of its box, or what it left running after it exited
    proc.wait()
    reader.join(timeout=10)
    seconds = time.perf_counter() - start
    if timed_out:
        log.write(f"[killed after {seconds:.0f} s: the time box of {timeout:.0f} s ran out]\n")
        log.flush()
    return Finished(argv, None if timed_out else proc.returncode, seconds, timed_out, "".join(tail))
