"""Shared benchmark harness for the custom ops: timing, peak memory, and the results table.

Each `benchmarks/ops_<family>.py` module exposes `cases(device) -> list[Case]`; `benchmarks/ops.py`
collects them and calls `run_cases`. A `Case.setup()` builds the inputs and returns two callables,
`(reference_fn, kernel_fn)`, each doing the whole measured work (e.g. forward + backward); setup is
only called when the case runs, so filtered-out cases never allocate.

Peak memory is "bytes allocated above what was live before the call":
- CUDA: `torch.cuda.reset_peak_memory_stats` then `max_memory_allocated - memory_allocated` (the
  caching allocator's own accounting of live tensors).
- CPU: the torch profiler with `profile_memory=True` records every allocation and free of torch's CPU
  allocator with a timestamp; the peak is the largest running sum of those, in time order. It counts
  tensor storage only (not the Python heap, not buffers a library mallocs itself), which is what the
  ops' memory claims are about, and unlike process RSS it is not hidden by the allocator's reuse of
  memory freed earlier.

Timings are medians over `repeat` calls after `warmup` calls, synchronising CUDA around each call.
Deliberately left out: statistics beyond the median, CUDA graphs, and any asserting on timings.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from typing import Callable

import torch

MIB = 1024 * 1024


@dataclasses.dataclass
class Case:
    """One benchmark row. `bytes_moved` (the bytes the op must read + write) adds a GB/s column."""

    op: str
    shape: str
    setup: Callable[[], tuple[Callable[[], object], Callable[[], object]]]
    device: str = "cpu"
    target: str | None = None
    bytes_moved: int | None = None


def _sync(device: str | torch.device | None = None) -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize(device if device is not None and torch.device(device).type == "cuda" else None)


def time_fn(fn: Callable[[], object], *, repeat: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of `fn()` over `repeat` calls, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        _sync()
        start = time.perf_counter()
        fn()
        _sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _cpu_peak_bytes(fn: Callable[[], object]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def peak_memory_bytes(fn: Callable[[], object], device: str | torch.device) -> int:
    """Peak bytes allocated by `fn()` above what was live before it (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        baseline = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - baseline
    return _cpu_peak_bytes(fn)


def _run_one(case: Case, repeat: int, warmup: int) -> dict:
    row = {"op": case.op, "shape": case.shape, "device": case.device, "target": case.target}
    reference_fn, kernel_fn = case.setup()
    row["reference_s"] = time_fn(reference_fn, repeat=repeat, warmup=warmup)
    row["kernel_s"] = time_fn(kernel_fn, repeat=repeat, warmup=warmup)
    row["speedup"] = row["reference_s"] / row["kernel_s"]
    row["reference_peak_bytes"] = peak_memory_bytes(reference_fn, case.device)
    row["kernel_peak_bytes"] = peak_memory_bytes(kernel_fn, case.device)
    if case.bytes_moved is not None:
        row["bytes_moved"] = case.bytes_moved
        row["kernel_gb_per_s"] = case.bytes_moved / row["kernel_s"] / 1e9
    return row


def _format(row: dict) -> str:
    if "error" in row:
        return f"{row['op']:<22} {row['shape']:<28} ERROR: {row['error']}"
    gbs = f"{row['kernel_gb_per_s']:9.1f}" if "kernel_gb_per_s" in row else f"{'':9}"
    target = f"  ({row['target']})" if row.get("target") else ""
    return (f"{row['op']:<22} {row['shape']:<28} {row['reference_s'] * 1e3:10.2f} {row['kernel_s'] * 1e3:10.2f} "
            f"{row['speedup']:8.2f}x {row['reference_peak_bytes'] / MIB:10.1f} {row['kernel_peak_bytes'] / MIB:10.1f}"
            f" {gbs}{target}")


def run_cases(cases: list[Case], json_path: str | None = None, *, repeat: int = 5, warmup: int = 1) -> list[dict]:
    """Run each case, print the table row by row, and save all rows as JSON when `json_path` is given.

    A case that raises is reported as an error row; the others still run.
    """
    print(f"{'op':<22} {'shape':<28} {'ref ms':>10} {'kernel ms':>10} {'speed-up':>9} "
          f"{'ref MiB':>10} {'kern MiB':>10} {'kern GB/s':>9}", flush=True)
    rows = []
    for case in cases:
        try:
            row = _run_one(case, repeat, warmup)
        except Exception as err:  # one broken case must not hide the others' numbers
            row = {"op": case.op, "shape": case.shape, "device": case.device, "error": f"{type(err).__name__}: {err}"}
        rows.append(row)
        print(_format(row), flush=True)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"torch": torch.__version__, "rows": rows}, f, indent=2)
    return rows
