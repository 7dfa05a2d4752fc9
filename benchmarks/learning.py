"""Does the recipe visibly work on every seed? The embedded default (`r1mega-train` with no arguments)
run once per seed, each from an empty cache (its own tokenizer and base-model pretraining, timed with
the rest), and R1-Zero's three curves read from its metrics:

- held-out pass@1 (k samples at T=0.6, top-p 0.95) and greedy accuracy, on the training difficulty and
  on the harder split (longer chains than any training question), base -> final;
- mean response length and reflective words per response of the held-out samples, base -> final;
- wall time of the whole run.

It prints one table and the issue's targets met or not, saves JSON (every seed's rows, the summary)
and a PNG of the curves (held-out pass@1, response length, reflective words over steps, one line per
seed). Runs go `--parallel` at a time: the default pins one thread per run (train.cpu_threads=1), so
two runs on a 2-core machine take about the wall time of one.

    python benchmarks/learning.py                      # seeds 0-4
    python benchmarks/learning.py --seeds 0 1 -- algo.lr=3e-4   # overrides after --
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("eval", "eval_hard")
FIELDS = ("accuracy", "greedy_accuracy", "response_length", "reflective_words")
# The targets of issue 17 (the recipe visibly works), checked on every seed.
MIN_RISE, MIN_LENGTH_RATIO, MIN_REFLECTION_RATIO, MAX_BASE_SPREAD = 0.30, 1.5, 2.0, 0.10


def run_seed(seed: int, out_dir: Path, overrides: list[str]) -> dict:
    """One default run from an empty cache; its held-out metrics before and after RL, and its wall time."""
    run_dir = out_dir / f"seed{seed}"
    with tempfile.TemporaryDirectory(prefix="r1mega-cache-") as cache:
        command = [sys.executable, "-m", "r1mega.cli.train", f"train.seed={seed}", f"train.out_dir={run_dir}",
                   "train.progress=false", "train.tensorboard=false", f"hydra.run.dir={run_dir}/hydra", *overrides]
        started = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT, env={**os.environ, "R1MEGA_CACHE": cache},
                              capture_output=True, text=True)
        wall = time.perf_counter() - started
    (run_dir / "stdout.txt").write_text(done.stdout + done.stderr)
    if done.returncode:
        raise RuntimeError(f"seed {seed} failed (exit {done.returncode}); see {run_dir}/stdout.txt:\n"
                           + (done.stdout + done.stderr)[-3000:])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evaluated = [row for row in rows if "eval/accuracy" in row]
    result = {"seed": seed, "wall_s": wall, "steps": rows[-1]["step"],
              "curve": [{"step": -1, **{f"{s}/{f}": rows[0].get(f"{s}/{f}_initial") for s in SPLITS for f in FIELDS}}]
              + [{"step": row["step"], **{f"{s}/{f}": row.get(f"{s}/{f}") for s in SPLITS for f in FIELDS}}
                 for row in evaluated],
              "rollout_curve": [{"step": row["step"], "response_length": row["response_length/mean"],
                                 "reflective_words": row["reflective_words/mean"], "accuracy": row.get("accuracy")}
                                for row in rows]}
    result["base"], result["final"] = result["curve"][0], result["curve"][-1]
    return result


def summarise(results: list[dict]) -> dict:
    def ratio(r, key):
        base = r["base"][key]
        return r["final"][key] / base if base else float("inf")

    base = [r["base"]["eval/accuracy"] for r in results]
    checks = {
        f"pass@1 rises by >= {MIN_RISE:.2f} on every seed":
            all(r["final"]["eval/accuracy"] - r["base"]["eval/accuracy"] >= MIN_RISE for r in results),
        "the harder split improves on every seed":
            all(r["final"]["eval_hard/accuracy"] > r["base"]["eval_hard/accuracy"] for r in results),
        f"final response length >= {MIN_LENGTH_RATIO}x the base's on every seed":
            all(ratio(r, "eval/response_length") >= MIN_LENGTH_RATIO for r in results),
        f"reflective words per response >= {MIN_REFLECTION_RATIO}x the base's on every seed":
            all(ratio(r, "eval/reflective_words") >= MIN_REFLECTION_RATIO for r in results),
        f"base pass@1 spreads by <= {MAX_BASE_SPREAD:.2f} over the seeds": max(base) - min(base) <= MAX_BASE_SPREAD,
    }
    return {"base_spread": max(base) - min(base), "max_wall_s": max(r["wall_s"] for r in results), "targets": checks}


def table(results: list[dict]) -> str:
    head = ("| seed | pass@1 (T=0.6) | greedy | harder split pass@1 | response length | reflective words "
            "| wall |\n|---:|---|---|---|---|---|---:|")
    def change(r, key, form):
        return f"{form.format(r['base'][key])} -> {form.format(r['final'][key])}"
    rows = [f"| {r['seed']} | {change(r, 'eval/accuracy', '{:.3f}')} | {change(r, 'eval/greedy_accuracy', '{:.3f}')} "
            f"| {change(r, 'eval_hard/accuracy', '{:.3f}')} | {change(r, 'eval/response_length', '{:.1f}')} "
            f"| {change(r, 'eval/reflective_words', '{:.2f}')} | {r['wall_s'] / 60:.1f} min |" for r in results]
    return "\n".join([head, *rows])


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("eval/accuracy", "held-out pass@1 (T=0.6, k=4)"), ("eval/response_length", "response length (tokens)"),
              ("eval/reflective_words", "reflective words per response"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 3.4))
    for ax, (key, title) in zip(axes, panels):
        for r in results:
            points = [(row["step"] + 1, row[key]) for row in r["curve"] if row[key] is not None]
            ax.plot(*zip(*points), "o-", ms=3, lw=1.3, label=f"seed {r['seed']}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--runs", default="runs/learning", help="where each seed's run is written")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/learning.json"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (after --)")
    args = parser.parse_args()
    runs = Path(args.runs).resolve()
    with ThreadPoolExecutor(args.parallel) as pool:
        results = list(pool.map(lambda seed: run_seed(seed, runs, args.overrides), args.seeds))
    summary = summarise(results)
    print(table(results))
    print(f"base pass@1 spread over the seeds: {summary['base_spread']:.3f}; longest run: "
          f"{summary['max_wall_s'] / 60:.1f} min ({args.parallel} at a time)")
    for target, met in summary["targets"].items():
        print(f"  [{'met' if met else 'NOT met'}] {target}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "overrides": args.overrides, "parallel": args.parallel,
                               "runs": results, "summary": summary}, indent=1) + "\n")
    plot(results, out.with_suffix(".png"))
    print(f"JSON in {out}, curves in {out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
