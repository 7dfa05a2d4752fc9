"""Shared benchmark harness for the custom ops: timing, peak memory, and the results table.

Each `benchmarks/ops_<family>.py` module exposes `cases(device) -> list[Case]`; `benchmarks/ops.py`
collects them and calls `run_cases`. A `Case.setup()` builds the inputs and returns
`(baselines, kernel_fn)`: `baselines` is one callable (named "reference") or a dict of named ones, each
doing the whole measured work (e.g. forward + backward); setup is only called when the case runs, so
filtered-out cases never allocate. Every baseline's time and the kernel's ratio to it come from the
same process, timed in interleaved rounds (one call of each per round), so a change in the machine's
load reaches all of them alike. With `bytes_moved`, a plain copy moving the same bytes (half read,
half written, between buffers allocated beforehand) is timed too: the kernel's GB/s next to what a
copy achieves in the same run. Likewise with `flops` (per call) the kernel's TFLOP/s, and with `matmul`
(m, k, n, dtype) a plain [m, k] x [k, n] product timed in the same rounds: the rate the device's
matrix units reach in this run, the ceiling a GEMM-bound kernel is read against.

Peak memory is "bytes allocated above what was live before the call":
- CUDA: `torch.cuda.reset_peak_memory_stats` then `max_memory_allocated - memory_allocated` (the
  caching allocator's own accounting of live tensors).
- CPU: the torch profiler with `profile_memory=True` records every allocation and free of torch's CPU
  allocator with a timestamp; the peak is the largest running sum of those, in time order. It counts
  tensor storage only (not the Python heap, not buffers a library mallocs itself), which is what the
  ops' memory claims are about, and unlike process RSS it is not hidden by the allocator's reuse of
  memory freed earlier.

Timings are medians over `repeat` rounds after `warmup` rounds, synchronising CUDA around each call.
Peak memory is measured for the kernel and the first baseline. Deliberately left out: statistics
beyond the median, CUDA graphs, and any asserting on timings.
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
    flops: int | None = None
    matmul: tuple[int, int, int, torch.dtype] | None = None


def _sync(device: str | torch.device | None = None) -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize(device if device is not None and torch.device(device).type == "cuda" else None)


def time_fns(fns: dict[str, Callable[[], object]], *, repeat: int = 5, warmup: int = 1) -> dict[str, float]:
    """Median wall-clock seconds of each `fn()` over `repeat` rounds (each round calls every fn once),
    after `warmup` untimed rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            _sync()
            start = time.perf_counter()
            fn()
            _sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _copy_of(bytes_moved: int, device: str) -> Callable[[], object]:
    """A copy that reads bytes_moved / 2 and writes as many, between buffers allocated now."""
    src = torch.empty(bytes_moved // 2, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src).fill_(0)
    return lambda: dst.copy_(src)


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


def _matmul_of(m: int, k: int, n: int, dtype: torch.dtype, device: str) -> Callable[[], object]:
    """An [m, k] x [k, n] product into a buffer allocated now (2 m k n FLOPs a call)."""
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(n, k, device=device).to(dtype)  # [n, k] transposed: the layout of an output matrix
    out = torch.empty(m, n, device=device, dtype=dtype)
    return lambda: torch.mm(a, b.t(), out=out)


COPY = "plain copy"
MATMUL = "plain matmul"


def _run_one(case: Case, repeat: int, warmup: int) -> dict:
    row = {"op": case.op, "shape": case.shape, "device": case.device, "target": case.target}
    baselines, kernel_fn = case.setup()
    if callable(baselines):
        baselines = {"reference": baselines}
    fns = {"kernel": kernel_fn, **baselines}
    if case.bytes_moved is not None:
        fns[COPY] = _copy_of(case.bytes_moved, case.device)
    if case.matmul is not None:
        fns[MATMUL] = _matmul_of(*case.matmul, case.device)
    times = time_fns(fns, repeat=repeat, warmup=warmup)
    row["kernel_s"] = times["kernel"]
    row["baselines"] = {name: {"s": times[name], "speedup": times[name] / times["kernel"]} for name in baselines}
    first = next(iter(baselines))
    row["kernel_peak_bytes"] = peak_memory_bytes(kernel_fn, case.device)
    row["baseline_peak_bytes"] = {first: peak_memory_bytes(baselines[first], case.device)}
    if case.bytes_moved is not None:
        row["bytes_moved"] = case.bytes_moved
        row["kernel_gb_per_s"] = case.bytes_moved / times["kernel"] / 1e9
        row["copy_s"] = times[COPY]
        row["copy_gb_per_s"] = case.bytes_moved / times[COPY] / 1e9
    if case.flops is not None:
        row["flops"] = case.flops
        row["kernel_tflops"] = case.flops / times["kernel"] / 1e12
    if case.matmul is not None:
        m, k, n, dtype = case.matmul
        row["matmul"] = f"[{m}, {k}] x [{k}, {n}] {str(dtype)[6:]}"
        row["matmul_s"] = times[MATMUL]
        row["matmul_tflops"] = 2 * m * k * n / times[MATMUL] / 1e12
    return row


def _format(row: dict) -> str:
    head = f"{row['op']:<22} {row['shape']:<32}"
    if "error" in row:
        return f"{head} ERROR: {row['error']}"
    (first, first_peak), = row["baseline_peak_bytes"].items()
    lines = [f"{head} kernel {row['kernel_s'] * 1e3:9.2f} ms  peak {row['kernel_peak_bytes'] / MIB:7.1f} MiB"
             f" ({first}: {first_peak / MIB:.1f} MiB)" + (f"  target {row['target']}" if row.get("target") else "")]
    if "bytes_moved" in row:
        lines.append(f"{'':55}{row['bytes_moved'] / 1e6:.1f} MB moved: kernel {row['kernel_gb_per_s']:.1f} GB/s, "
                     f"a plain copy of as many bytes {row['copy_s'] * 1e3:.2f} ms = {row['copy_gb_per_s']:.1f} GB/s "
                     f"(kernel = {row['copy_s'] / row['kernel_s']:.0%} of copy speed)")
    if "kernel_tflops" in row:
        line = f"{'':55}{row['flops'] / 1e12:.3g} TFLOP a call: kernel {row['kernel_tflops']:.1f} TFLOP/s"
        if "matmul_tflops" in row:
            line += (f", a plain {row['matmul']} matmul {row['matmul_tflops']:.1f} TFLOP/s "
                     f"(kernel = {row['kernel_tflops'] / row['matmul_tflops']:.0%} of it)")
        lines.append(line)
    for name, b in row["baselines"].items():
        lines.append(f"{'':55}vs {name:<18} {b['s'] * 1e3:9.2f} ms  {b['speedup']:7.2f}x")
    return "\n".join(lines)


def run_cases(cases: list[Case], json_path: str | None = None, *, repeat: int = 5, warmup: int = 1) -> list[dict]:
    """Run each case, print the table row by row, and save all rows as JSON when `json_path` is given.

    A case that raises is reported as an error row; the others still run.
    """
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; speed-up = baseline time / kernel time",
          flush=True)
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
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "repeat": repeat,
                       "rows": rows}, f, indent=2)
    return rows
