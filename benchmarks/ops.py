"""Benchmark driver for the custom ops: kernel vs its baselines (the peers' code where a family has
them, else the plain-PyTorch reference), time and peak memory.

    python benchmarks/ops.py [--device cpu|cuda] [--only NAME] [--json PATH] [--repeat N] [--threads N] [--toy]

Collects `cases(device, toy)` from each `benchmarks/ops_<family>.py` (a module that is missing or fails to
import is skipped with a note) and runs them with `harness.run_cases`. `--only` keeps the cases whose
op is exactly NAME, or, when none is, whose op contains NAME. The CPU numbers on a shared machine are
noisy: benchmark one op at a time with `--only`. `--toy` runs every family at a toy size, in seconds: a
check that the benchmarks themselves run (gpu_check.py's dry run), whose numbers mean nothing.
"""

from __future__ import annotations

import argparse
import importlib
import pathlib
import sys

_HERE = pathlib.Path(__file__).resolve().parent
sys.path[:0] = [str(_HERE), str(_HERE.parent)]  # `import harness` and `import r1mega` from a checkout

import harness  # noqa: E402

MODULES = ("ops_grpo", "ops_linear", "ops_moe")


def collect(device: str, toy: bool = False) -> list[harness.Case]:
    cases = []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as err:
            if err.name != name:
                raise
            print(f"note: benchmarks/{name}.py is not there yet; skipped", file=sys.stderr)
            continue
        except Exception as err:  # another family's broken module must not stop this run
            print(f"note: benchmarks/{name}.py failed to import ({type(err).__name__}: {err}); skipped", file=sys.stderr)
            continue
        cases += module.cases(device, toy=toy)
    return cases


def select(cases: list[harness.Case], only: str | None) -> list[harness.Case]:
    if not only:
        return cases
    exact = [c for c in cases if c.op == only]
    return exact or [c for c in cases if only in c.op]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--only", default=None, help="op name (exact match first, else substring)")
    parser.add_argument("--json", default=None, help="where to save the rows as JSON")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--toy", action="store_true", help="toy sizes: checks that the benchmarks run")
    args = parser.parse_args(argv)
    if args.threads:
        __import__("torch").set_num_threads(args.threads)
    if args.device == "cuda" and not __import__("torch").cuda.is_available():
        parser.error("--device cuda: no CUDA device here")
    cases = select(collect(args.device, args.toy), args.only)
    if not cases:
        parser.error(f"no case matches --only {args.only!r}")
    harness.run_cases(cases, args.json, repeat=args.repeat, warmup=args.warmup)


if __name__ == "__main__":
    main()
