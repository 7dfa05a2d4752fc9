"""A rank that dies (SIGKILL or an exception) ends every rank non-zero, within 60 s, naming the rank.

Plain processes with torchrun's environment variables (as on several nodes, where no one agent sees
every worker), and a torchrun run where the agent sees the failure too.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import free_port

pytestmark = pytest.mark.distributed
WORKER = str(Path(__file__).with_name("launch_worker.py"))
ROOT = str(Path(__file__).resolve().parents[2])


def _env(rank: int, world: int, port: int) -> dict:
    env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(port), PYTHONPATH=ROOT)
    return env


def _run_plain(mode: str, victim: int, world: int = 2):
    port = free_port()
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, WORKER, mode, str(victim)], env=_env(r, world, port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    outs = [p.communicate(timeout=90) for p in procs]
    return [p.returncode for p in procs], [o + e for o, e in outs], time.monotonic() - start


@pytest.mark.parametrize("mode,victim", [("kill", 1), pytest.param("raise", 1, marks=pytest.mark.slow),
                                        pytest.param("kill", 0, marks=pytest.mark.slow)])
def test_dead_rank_stops_every_rank_and_is_named(mode, victim):
    codes, outs, elapsed = _run_plain(mode, victim)
    assert all(c != 0 for c in codes), (codes, outs)
    assert elapsed < 60
    for r, out in enumerate(outs):
        if r != victim or mode == "raise":
            assert f"rank {victim}" in out.split("stopping:")[-1], out


@pytest.mark.slow
def test_clean_run_exits_zero():
    codes, outs, _ = _run_plain("ok", -1)
    assert codes == [0, 0], outs
    assert all("finished" in o for o in outs)


@pytest.mark.slow
def test_torchrun_names_the_failed_rank():
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--max_restarts=0",
                           f"--master_port={free_port()}", WORKER, "kill", "1"], capture_output=True, text=True,
                          timeout=90, env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode != 0
    assert time.monotonic() - start < 60
    assert "rank      : 1" in proc.stderr or "rank: 1" in proc.stderr.replace("  ", " "), proc.stderr[-3000:]
