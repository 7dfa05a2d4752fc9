"""GPU verification kit: one prepared run that checks and measures r1mega's CUDA half in a short GPU lease.

    python benchmarks/gpu_check.py                       # on the GPU machine; JSON into $OUT (or --out DIR)
    python benchmarks/gpu_check.py --dry-run --out DIR   # on a CPU: every part at toy size, in well under a minute
    python benchmarks/gpu_check.py --fetch-wheels        # here, before the lease: the wheels that machine lacks
    python benchmarks/gpu_check.py --parts d,e           # a rerun of some parts (a warm machine keeps the build)

The parts run in this order, each as subprocesses in its own time box (their process group is killed
when it ends); each writes `part_<key>.json` into the output folder the moment it ends, and
`summary.json` is rewritten after every part, so a later failure, or the lease's end, loses nothing:

  setup  the wheels of benchmarks/gpu_wheels.txt (carried in benchmarks/wheels/) installed into a private
         folder put first on PYTHONPATH; the extension built for sm_90 (TORCH_CUDA_ARCH_LIST=9.0
         python setup.py build_ext --inplace); which kernel each op runs on each device.
  a      pytest -m gpu tests/unit: every CUDA kernel against its plain-PyTorch reference, fp32 and bf16.
  b      benchmarks/ops.py --device cuda, one op family at a time: grpo_loss GB/s against a plain copy,
         linear_logprob / linear_grpo_loss TFLOP/s against a plain bf16 matmul, the MoE routing ops,
         group_advantages; every baseline timed in the same process as the kernel.
  c      benchmarks/rollout.py: the native engine against transformers' `generate` on the same model
         (bench_models.moe_0p7b, bf16), batch 64, prompt 64, 512 new tokens.
  d      benchmarks/grpo_step.py: a GRPO step on that MoE with 16,384-token micro-batches: tokens/s and
         MFU (model FLOPs from the config, benchmarks/model_flops.py).
  e      the megatron backend: tests/gpu/test_megatron_backend.py (logits parity with native in fp32
         and bf16, one GRPO step) and benchmarks/megatron_vs_native.py (tokens/s of both).

A part's status is ok, failed, timed out, or skipped (with its reason). The run stays inside
`--deadline` seconds (default 540; the device tool allows 600 a command): a part gets its own box or
what is left, whichever is less, and one with under 20 s left is skipped. The output folder receives
8 files, what the device tool brings back: summary.json, part_<key>.json of the six parts, gpu_check.log.

`--dry-run` (CPU): setup checks that the wheels install for Python 3.12 (into a scratch folder, not
used) and that the extension imports, without building; a runs pytest -m gpu on one test file (each
test skips itself: no CUDA device), so a is reported skipped; b, c and d run at toy size on the CPU; e
is skipped (megatron-core builds its models on a GPU). tests/unit/test_gpu_check.py runs it.
Deliberately left out: the wip/grpo-loss-bandwidth kernel of the issue (no such branch here), CUDA
graphs in the engine's decode (not written yet), SGLang (benchmarks/sglang_engine.py).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time
import xml.etree.ElementTree as ET

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import gpu_wheels  # noqa: E402
import timebox  # noqa: E402

PY = sys.executable
MIN_LEFT = 20  # seconds: a part with less left is skipped
OPS_FAMILIES = [("grpo_loss", 4), ("linear", 3), ("moe", 2), ("group_advantages", 1)]  # part b: (--only, share)
MEGATRON_CPU = ("megatron-core builds its models on a CUDA device "
                "(tests/unit/test_megatron_backend_cpu.py runs a CPU shim)")


class Context:
    """What the parts share: the mode, the scratch folder, the environment, the clock, the probe's findings."""

    def __init__(self, args, out: pathlib.Path, log):
        self.dry_run, self.out, self.log = args.dry_run, out, log
        self.tmp = pathlib.Path(tempfile.mkdtemp(prefix="gpu_check_"))
        self.site = pathlib.Path(args.site)
        self.deadline = time.monotonic() + args.deadline
        self.pythonpath = [str(REPO)]
        self.probe: dict = {}
        self.blocked: dict[str, str] = {}  # part -> why it cannot run (set by setup)

    def env(self) -> dict:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(self.pythonpath + [p for p in [os.environ.get("PYTHONPATH")] if p])
        if self.dry_run:  # a shared CPU: one thread each, as the project's tests do
            env.setdefault("OMP_NUM_THREADS", "1")
        return env

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, argv: list, timeout: float, **extra_env) -> timebox.Finished:
        return timebox.run([str(a) for a in argv], timeout, cwd=REPO, env={**self.env(), **extra_env}, log=self.log)


def _status(done: timebox.Finished) -> str | None:
    """'timed out' / 'failed' for a command that did not succeed, else None."""
    return "timed out" if done.timed_out else "failed" if done.rc != 0 else None


def _read_json(path: pathlib.Path):
    return json.loads(path.read_text()) if path.exists() else None


def _shares(budget: float, weights: list[int]):
    """Yields each step's time box: its share of what is left, so time an early step leaves goes on."""
    end = time.monotonic() + budget
    for i, w in enumerate(weights):
        yield max(1.0, (end - time.monotonic()) * w / sum(weights[i:]))


# ---- setup ------------------------------------------------------------------------------------------
def probe(imports: bool) -> dict:
    """Runs in a subprocess (--probe): torch, the device, which kernel each op has, and with `imports`
    whether the packages the parts need import (the carried wheels among them)."""
    import importlib

    import torch

    from r1mega.info import OPS
    from r1mega.ops import _extension

    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    found = {}
    for name in ("hydra", "omegaconf", "math_verify", "megatron.core", "transformers") if imports else ():
        try:
            importlib.import_module(name)
            found[name] = "ok"
        except Exception as err:  # noqa: BLE001  (any failure to import is the finding)
            found[name] = f"{type(err).__name__}: {err}"
    return {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "kernels_build": _extension.BUILD,
            "kernels": {op: {d: _extension.has_kernel(schema, d) for d in devices} for op, schema in OPS.items()},
            "imports": found if imports else "not checked in the dry run (this machine's packages, not the wheels)"}


def part_setup(ctx: Context, box: float) -> dict:
    results, commands = {}, []
    wheels = gpu_wheels.wheels()
    if not wheels:
        results["wheels"] = f"none in {gpu_wheels.FOLDER.relative_to(REPO)} (run --fetch-wheels before the lease)"
    else:
        issues = gpu_wheels.problems(wheels)
        if issues:
            return {"status": "failed", "reason": "; ".join(issues), "results": results}
        target = ctx.tmp / "site-py3.12" if ctx.dry_run else ctx.site
        done = ctx.run(gpu_wheels.install_argv(target, for_gpu_python=ctx.dry_run), min(60, box))
        commands.append(done.as_dict())
        results["wheels"] = {"installed": [w.name for w in wheels], "into": str(target)}
        if _status(done):
            return {"status": _status(done), "reason": "pip could not install the wheels", "results": results,
                    "commands": commands, "log_tail": done.tail}
        if not ctx.dry_run:
            ctx.pythonpath.insert(0, str(target))
    if ctx.dry_run:
        results["build"] = "skipped in the dry run: it uses the extension built here; the sm_90 build needs nvcc"
    else:
        done = ctx.run([PY, "setup.py", "build_ext", "--inplace"], box - 40, TORCH_CUDA_ARCH_LIST="9.0",
                       MAX_JOBS=str(os.cpu_count() or 8))
        commands.append(done.as_dict())
        results["build"] = "TORCH_CUDA_ARCH_LIST=9.0 python setup.py build_ext --inplace"
        if _status(done):
            ctx.blocked = {key: "no kernels to test: the build failed (part_setup.json)" for key in "ab"}
            return {"status": _status(done), "reason": "the extension did not build", "results": results,
                    "commands": commands, "log_tail": done.tail}
    if not ctx.dry_run and shutil.which("nvidia-smi"):
        done = ctx.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem",
                        "--format=csv"], 20)
        results["nvidia_smi"] = done.tail.strip()
    probe_json = ctx.tmp / "probe.json"
    done = ctx.run([PY, __file__, "--probe", probe_json, *(["--no-imports"] if ctx.dry_run else [])], 60)
    commands.append(done.as_dict())
    ctx.probe = results["probe"] = _read_json(probe_json) or {}
    if _status(done) or not ctx.probe:
        return {"status": _status(done) or "failed", "reason": "the probe of torch and the kernels failed",
                "results": results, "commands": commands, "log_tail": done.tail}
    if not ctx.dry_run and ctx.probe["device"] == "cpu":
        ctx.blocked = {key: "torch sees no CUDA device (part_setup.json)" for key in "abcde"}
        return {"status": "failed", "reason": "torch sees no CUDA device", "results": results, "commands": commands}
    device = "cpu" if ctx.dry_run else "cuda"
    missing = [op for op, on in ctx.probe["kernels"].items() if not on.get(device)]
    if missing:
        ctx.blocked = {key: "no kernels to test: setup failed (part_setup.json)" for key in "ab"}
        return {"status": "failed", "reason": f"no compiled {device} kernel for {', '.join(missing)}",
                "results": results, "commands": commands}
    return {"status": "ok", "results": results, "commands": commands}


# ---- a: GPU tests ---------------------------------------------------------------------------------------
def junit_counts(path: pathlib.Path) -> dict | None:
    """Counts of a pytest --junitxml report, the failures by name and the skip reasons by count."""
    if not path.exists():
        return None
    cases = ET.parse(path).getroot().iter("testcase")
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures, skips = [], collections.Counter()
    for case in cases:
        name = f"{case.get('classname')}::{case.get('name')}"
        outcome = next((child for child in case if child.tag in ("failure", "error", "skipped")), None)
        if outcome is None:
            counts["passed"] += 1
        elif outcome.tag == "skipped":
            counts["skipped"] += 1
            skips[(outcome.get("message") or "").strip()[:160]] += 1
        else:
            counts["failed" if outcome.tag == "failure" else "errors"] += 1
            failures.append(f"{name}: {(outcome.get('message') or '').strip()[:300]}")
    return {**counts, "failures": failures, "skip_reasons": dict(skips.most_common())}


def pytest_part(ctx: Context, paths: list[str], box: float, report: str) -> tuple[dict, timebox.Finished]:
    junit = ctx.tmp / report
    done = ctx.run([PY, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", "--continue-on-collection-errors",
                    f"--junitxml={junit}", *paths], box)
    counts = junit_counts(junit)
    base = {"results": counts or {}, "commands": [done.as_dict()], "log_tail": done.tail}
    if done.timed_out:
        return {**base, "status": "timed out"}, done
    if counts is None or counts["failed"] or counts["errors"] or done.rc not in (0,):
        return {**base, "status": "failed", "reason": f"pytest exit {done.rc}"}, done
    if counts["passed"] == 0:
        reason = next(iter(counts["skip_reasons"]), "no test ran")
        return {**base, "status": "skipped", "reason": f"every test skipped itself ({reason})"}, done
    return {**base, "status": "ok"}, done


def part_a(ctx: Context, box: float) -> dict:
    # The dry run: one op's tests, whose CUDA cases skip themselves on a CPU (the whole folder takes longer).
    paths = ["tests/unit/test_op_grpo_loss.py"] if ctx.dry_run else ["tests/unit"]
    return pytest_part(ctx, paths, box, "a_pytest.xml")[0]


# ---- b: op benchmarks ---------------------------------------------------------------------------------
def _headline(row: dict) -> dict:
    """The numbers of an ops.py row that RESULTS.md quotes."""
    out = {"op": row["op"], "shape": row["shape"]}
    if "error" in row:
        return {**out, "error": row["error"]}
    out["kernel_ms"] = row["kernel_s"] * 1e3
    out["speedups"] = {name: b["speedup"] for name, b in row["baselines"].items()}
    if "copy_gb_per_s" in row:
        out.update(kernel_gb_per_s=row["kernel_gb_per_s"], copy_gb_per_s=row["copy_gb_per_s"],
                   of_copy=row["kernel_gb_per_s"] / row["copy_gb_per_s"])
    if "matmul_tflops" in row:
        out.update(kernel_tflops=row["kernel_tflops"], matmul_tflops=row["matmul_tflops"],
                   of_matmul=row["kernel_tflops"] / row["matmul_tflops"])
    return out


def part_b(ctx: Context, box: float) -> dict:
    if ctx.dry_run:
        runs = zip(["toy"], [["--device", "cpu", "--toy", "--repeat", "1", "--threads", "1"]], [box])
    else:  # one family a process, each its share of what is left (its box computed when its turn comes)
        runs = zip([fam for fam, _ in OPS_FAMILIES],
                   [["--device", "cuda", "--only", fam, "--repeat", "5"] for fam, _ in OPS_FAMILIES],
                   _shares(box, [w for _, w in OPS_FAMILIES]))
    rows, commands, status, tail = [], [], "ok", ""
    for name, flags, limit in runs:
        path = ctx.tmp / f"ops_{name}.json"
        done = ctx.run([PY, "benchmarks/ops.py", *flags, "--json", path], limit)
        commands.append(done.as_dict())
        rows += (_read_json(path) or {}).get("rows", [])
        if _status(done):
            status, tail = ("timed out" if done.timed_out and status == "ok" else "failed"), done.tail
    errors = [r for r in rows if "error" in r]
    result = {"status": status, "results": {"headline": [_headline(r) for r in rows], "rows": rows},
              "commands": commands}
    if errors and status == "ok":
        result.update(status="failed", reason=f"{len(errors)} of {len(rows)} cases raised: {errors[0]['error']}")
    elif status != "ok":
        result.update(reason="an op family's benchmark did not finish (see commands)", log_tail=tail)
    return result


# ---- c, d: engine throughput and the GRPO step ------------------------------------------------------------
def _script_part(ctx: Context, argv: list, box: float, json_path: pathlib.Path, key: str | None = None) -> dict:
    done = ctx.run(argv, box)
    data = _read_json(json_path)
    result = {"status": _status(done) or ("ok" if data else "failed"), "results": data or {},
              "commands": [done.as_dict()]}
    if result["status"] != "ok":
        result.update(reason=f"{argv[1]} did not finish", log_tail=done.tail)
    elif key and key not in data:
        result.update(status="failed", reason=f"{argv[1]} wrote no {key!r}")
    return result


def part_c(ctx: Context, box: float) -> dict:
    path = ctx.tmp / "rollout.json"
    size = (["--device", "cpu", "--preset", "toy", "--batch", "4", "--prompt", "8", "--output", "8", "--threads", "1"]
            if ctx.dry_run else
            ["--device", "cuda", "--preset", "moe_0p7b", "--dtype", "bfloat16", "--batch", "64", "--prompt", "64",
             "--output", "512"])
    argv = [PY, "benchmarks/rollout.py", *size, "--long-tokens", "0", "--throughput-repeat", "1", "--repeat", "3",
            "--json", path]
    result = _script_part(ctx, argv, box, path, key="throughput")
    if result["status"] == "ok":
        result["results"]["target"] = "native engine >= 3x transformers generate"
    return result


def part_d(ctx: Context, box: float) -> dict:
    path = ctx.tmp / "grpo_step.json"
    size = (["--model", "toy", "--device", "cpu", "--prompt", "16", "--response", "48", "--token-budget", "256",
             "--questions", "2", "--group", "2", "--steps", "1", "--matmul-size", "256", "--threads", "1"]
            if ctx.dry_run else ["--model", "moe_0p7b", "--device", "cuda", "--steps", "3"])
    result = _script_part(ctx, [PY, "benchmarks/grpo_step.py", *size, "--json", path], box, path, key="mfu")
    if result["status"] == "ok":
        result["results"]["target"] = "MFU >= 30% (prime-rl: 26.8% at long context on one H100)"
    return result


# ---- e: megatron ---------------------------------------------------------------------------------------
def part_e(ctx: Context, box: float) -> dict:
    if ctx.dry_run:
        return {"status": "skipped", "reason": MEGATRON_CPU}
    if ctx.probe.get("imports", {}).get("megatron.core") != "ok":  # a dict on the GPU (the dry run returned above)
        return {"status": "skipped", "reason": f"megatron-core does not import: {ctx.probe.get('imports')}"}
    boxes = _shares(box, [1, 1])
    tests, done = pytest_part(ctx, ["tests/gpu/test_megatron_backend.py"], next(boxes), "e_pytest.xml")
    path = ctx.tmp / "megatron_vs_native.json"
    bench = _script_part(ctx, [PY, "benchmarks/megatron_vs_native.py", "--repeat", "3", "--warmup", "1", "--json",
                               path], next(boxes), path)
    rows = bench["results"] if isinstance(bench["results"], list) else []
    tokens = {(r["model"], r["backend"]): r["tokens_per_s"] for r in rows}
    ratios = {m: tokens[(m, "megatron")] / tokens[(m, "native")] for m, _ in tokens
              if (m, "megatron") in tokens and (m, "native") in tokens}
    status = next((s for s in ("timed out", "failed") if s in (tests["status"], bench["status"])), "ok")
    if status == "ok" and tests["status"] == "skipped":
        status = "failed"  # on a GPU the megatron tests must run
    result = {"status": status, "results": {"tests": tests["results"], "benchmark": rows,
                                            "megatron_over_native_tokens_per_s": ratios,
                                            "target": "megatron within 10% of native or better"},
              "commands": tests["commands"] + bench["commands"]}
    if status != "ok":
        result.update(reason=f"tests: {tests['status']}, benchmark: {bench['status']}",
                      log_tail=tests.get("log_tail", "") + bench.get("log_tail", ""))
    return result


def headline(key: str, part: dict) -> dict | None:
    """The few numbers of a part the summary repeats (the part's JSON has them all)."""
    r = part.get("results")
    if not r:
        return None
    if key == "setup":
        return {k: r.get("probe", {}).get(k) for k in ("device", "torch", "kernels_build")}
    if key == "a":
        return {k: r[k] for k in ("passed", "failed", "errors", "skipped")}
    if key == "b":
        return {f"{h['op']} {h['shape']}": h.get("error") or {k: round(h[k], 3) for k in ("kernel_ms", "of_copy",
                                                                                          "of_matmul") if k in h}
                for h in r["headline"]}
    if key == "c" and "throughput" in r:
        return {k: r["throughput"][k] for k in ("native_tokens_per_s", "transformers_tokens_per_s", "speedup")}
    if key == "d" and "mfu" in r:
        return {k: r[k] for k in ("tokens_per_s", "achieved_tflops", "mfu", "mfu_vs_matmul")}
    if key == "e":
        return r.get("megatron_over_native_tokens_per_s")
    return None


PARTS = [  # key, what it checks, time box on the GPU in seconds
    ("setup", "wheels installed, extension built for sm_90, kernels present", 200, part_setup),
    ("a", "pytest -m gpu tests/unit: CUDA kernels against their references", 90, part_a),
    ("b", "benchmarks/ops.py --device cuda: bandwidth, TFLOP/s, speed-ups", 120, part_b),
    ("c", "native engine vs transformers generate, batch 64, 512 new tokens", 75, part_c),
    ("d", "GRPO step on a 0.68B DeepSeek-V3-style MoE, 16k-token micro-batches: tokens/s, MFU", 45, part_d),
    ("e", "megatron backend: parity with native, a GRPO step, tokens/s of both", 60, part_e),
]


def run_parts(args, out: pathlib.Path) -> dict:
    selected = set(args.parts.split(",")) if args.parts else {key for key, *_ in PARTS}
    summary = {"kit": "benchmarks/gpu_check.py", "argv": sys.argv[1:], "dry_run": args.dry_run,
               "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "deadline_s": args.deadline, "parts": {}, "finished": False}
    with open(out / "gpu_check.log", "a") as log:
        ctx = Context(args, out, log)
        try:
            for key, title, box, fn in PARTS:
                start = time.monotonic()
                limit = min(box, ctx.left())
                if key != "setup" and key not in selected:
                    part = {"status": "skipped", "reason": "not selected (--parts)"}
                elif limit < MIN_LEFT:
                    part = {"status": "skipped", "reason": f"out of time: {ctx.left():.0f} s of --deadline left"}
                elif key in ctx.blocked:
                    part = {"status": "skipped", "reason": ctx.blocked[key]}
                else:
                    log.write(f"\n==== part {key}: {title} ====\n")
                    part = fn(ctx, limit)
                part = {"part": key, "title": title, "status": part.pop("status"), **part,
                        "seconds": round(time.monotonic() - start, 2), "headline": headline(key, part)}
                (out / f"part_{key}.json").write_text(json.dumps(part, indent=2) + "\n")
                summary["parts"][key] = {k: part[k] for k in ("title", "status", "reason", "seconds", "headline")
                                         if part.get(k) is not None}
                summary["device"] = ctx.probe.get("device")
                summary["torch"] = ctx.probe.get("torch")
                (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
                print(f"==== part {key}: {part['status']}" + (f" ({part['reason']})" if "reason" in part else "")
                      + f", {part['seconds']:.0f} s", flush=True)
        finally:
            shutil.rmtree(ctx.tmp, ignore_errors=True)
    summary["finished"] = True
    # ok: nothing failed or timed out, and no part was left out for lack of time
    summary["ok"] = all(p["status"] == "ok" or (p["status"] == "skipped" and not p["reason"].startswith("out of time"))
                        for p in summary["parts"].values())
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="every part at toy size on the CPU")
    parser.add_argument("--out", default=None, help="where the JSON goes (default: $OUT)")
    parser.add_argument("--parts", default=None, help="comma-separated keys among a,b,c,d,e (setup always runs)")
    parser.add_argument("--deadline", type=float, default=540, help="seconds for the whole run")
    parser.add_argument("--site", default="/tmp/r1mega_site", help="where the wheels are installed")
    parser.add_argument("--fetch-wheels", action="store_true", help="download benchmarks/gpu_wheels.txt and exit")
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # internal: write probe() to this path
    parser.add_argument("--no-imports", action="store_true", help=argparse.SUPPRESS)  # internal, with --probe
    args = parser.parse_args(argv)
    if args.probe:
        pathlib.Path(args.probe).write_text(json.dumps(probe(imports=not args.no_imports), indent=2))
        return 0
    if args.fetch_wheels:
        return gpu_wheels.fetch()
    unknown = set(args.parts.split(",")) - {key for key, *_ in PARTS[1:]} if args.parts else set()
    if unknown:
        parser.error(f"--parts: unknown {', '.join(sorted(unknown))}")
    out = args.out or os.environ.get("OUT")
    if not out:
        parser.error("give --out DIR (or set $OUT)")
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = run_parts(args, out)
    for key, part in summary["parts"].items():
        print(f"{key:<6} {part['status']:<10} {part['seconds']:7.1f} s  {part.get('reason', '')}")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
