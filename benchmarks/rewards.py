"""Throughput of the rule rewards: samples/s of maths and code scoring, serial vs the scoring pool.

    python benchmarks/rewards.py [--workers N] [--math N] [--code N] [--json PATH]

Maths: R1-Zero completions with answers in several equivalent forms (half right, half wrong), scored
with math_accuracy + format_r1_zero. Code: completions solving an a+b problem against 3 stdin/stdout
tests in the sandbox (code_accuracy), a tenth of them an infinite loop that runs into the time limit.
"serial" is `ScoringPool(num_workers=0)` (in-process), "pool" the same with worker processes; the
pool's workers are started (and warm) before timing. Prints a table and saves the rows as JSON
(default benchmarks/results/rewards.json). Deliberately left out: reward models (GPU-bound, batched
elsewhere) and repeated timings (each row is one pass).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from r1mega.rewards import ScoringPool  # noqa: E402
from r1mega.rewards.sandbox import isolation_report  # noqa: E402

FORMS = [("1/2", [r"\frac{1}{2}", "0.5", r"\dfrac12"]), (r"\{1,2\}", [r"\{2,1\}", "{1, 2}"]),
         ("(0,1]", ["(0, 1]"]), ("42", ["42", "42.0"]), (r"\sqrt{2}/2", [r"\frac{\sqrt{2}}{2}"])]
ADD = "a, b = map(int, input().split())\nprint(a + b)\n"
LOOP = "while True:\n    pass\n"


def math_batch(n: int, rng: random.Random) -> tuple[list[str], list[dict]]:
    completions, samples = [], []
    for i in range(n):
        truth, forms = rng.choice(FORMS)
        answer = rng.choice(forms) if i % 2 == 0 else "7/3"
        completions.append(f"<think> working it out step by step </think><answer> {answer} </answer>")
        samples.append({"answer": truth})
    return completions, samples


def code_batch(n: int, rng: random.Random) -> tuple[list[str], list[dict]]:
    tests = [{"input": f"{a} {b}\n", "output": str(a + b)} for a, b in [(1, 2), (10, -3), (123, 456)]]
    completions = [f"<think>add</think>\n```python\n{LOOP if i % 10 == 9 else ADD}```" for i in range(n)]
    return completions, [{"tests": tests, "time_limit_s": 1.0} for _ in range(n)]


def measure(name: str, components, completions, samples, workers: int, timeout: float) -> dict:
    with ScoringPool(components, workers, timeout) as pool:
        if workers:
            pool.score(completions[:workers], samples[:workers])  # start and warm the workers
        started = time.perf_counter()
        result = pool.score(completions, samples)
        elapsed = time.perf_counter() - started
    return {"reward": name, "mode": f"pool x{workers}" if workers else "serial", "samples": len(completions),
            "seconds": round(elapsed, 3), "samples_per_s": round(len(completions) / elapsed, 2),
            "mean_reward": round(sum(result.rewards) / len(result.rewards), 3),
            "errors": result.metrics["reward/errors"], "timeouts": result.metrics["reward/timeouts"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    parser.add_argument("--math", type=int, default=200, help="maths samples")
    parser.add_argument("--code", type=int, default=20, help="code samples")
    parser.add_argument("--json", default=str(Path(__file__).parent / "results" / "rewards.json"))
    args = parser.parse_args(argv)

    rng = random.Random(0)
    math_c, math_s = math_batch(args.math, rng)
    code_c, code_s = code_batch(args.code, rng)
    rows = []
    for workers in (0, args.workers):
        rows.append(measure("math_accuracy+format", {"math_accuracy": 1.0, "format_r1_zero": 1.0},
                            math_c, math_s, workers, timeout=10))
        rows.append(measure("code_accuracy", {"code_accuracy": 1.0}, code_c, code_s, workers, timeout=30))

    print(f"sandbox: {isolation_report()['mode']}, cpus: {os.cpu_count()}")
    header = ["reward", "mode", "samples", "seconds", "samples_per_s", "mean_reward", "errors", "timeouts"]
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in header]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in sorted(rows, key=lambda r: r["reward"]):
        print("  ".join(str(row[h]).ljust(w) for h, w in zip(header, widths)))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"isolation": isolation_report(), "rows": rows}, indent=2) + "\n")
    print(f"saved {args.json}")


if __name__ == "__main__":
    main()
