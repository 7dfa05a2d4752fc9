"""One-step-off rollouts against the synchronous loop, on the same settings: wall time per rollout (one
rollout = generation, scoring, the optimizer steps, the weight copy), and how much of the generation the
training hid.

    python benchmarks/async_rollouts.py                       # tiny DeepSeek-V3 (random weights), CPU
    python benchmarks/async_rollouts.py --rollouts 8 -- rollout.max_new_tokens=[[0,128]]

Each mode runs `--rollouts` rollouts of the embedded tiny experiment in this process (random weights, so
no pretraining; rule rewards) after one warm-up rollout; reported: the median seconds per rollout, the
rollouts per second, and from the trainer's metrics the generation time the step waited for
(`time/rollout`) and, one-step-off, the generation time that ran beside training
(`time/rollout_background`). Modes: `sync` (rollout.staleness=0), `one_step_off` (staleness=1), and
`partial` (staleness=1 with partial rollouts: 1/4 of max_new_tokens a segment, half a batch of extra
questions in flight).

What a CPU can overlap: generation runs on a Python thread beside the training step. Both are torch ops
that release the GIL while they compute, so with `--threads` intra-op threads each and at least twice
that many free cores they run side by side; the decode loop's Python (sampling, stop checks, the KV
cache's bookkeeping) holds the GIL between its ops and so contends with the trainer's. On a machine
whose cores are already busy, the two compete for the same cores and one-step-off gains little or
nothing: its wall time is then the sum of both, as the synchronous loop's. On a GPU the rollout and the
step share the device's streams instead (generation would need its own stream or device to overlap).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = {"sync": [], "one_step_off": ["rollout.staleness=1"]}


def run(overrides: list[str], rollouts: int) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from r1mega.cli.train import CONF_DIR
    from r1mega.config import register_configs
    from r1mega.trainers.grpo import GRPOTrainer

    register_configs()
    with tempfile.TemporaryDirectory() as out, initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = OmegaConf.to_object(compose("config", overrides=[
            "model.init=random", "train.progress=false", "train.tensorboard=false", f"train.out_dir={out}",
            *overrides]))
        trainer = GRPOTrainer(cfg)
        try:
            walls, rows = [], []
            for index in range(rollouts + 1):
                started = time.perf_counter()
                row = trainer.train_step()
                if index:  # the first rollout warms up (and, one-step-off, generates two batches)
                    walls.append(time.perf_counter() - started)
                    rows.append(row)
        finally:
            trainer.scorer.close()
    wall = statistics.median(walls)
    return {"seconds_per_rollout": wall, "rollouts_per_s": 1 / wall,
            "waited_for_generation_s": statistics.median(r["time/rollout"] for r in rows),
            "generation_beside_training_s": statistics.median(r.get("time/rollout_background", 0.0) for r in rows),
            "train_s": statistics.median(r["time/train"] for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rollouts", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (train.cpu_threads)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/async_rollouts_cpu.json"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides after --")
    args = parser.parse_args()
    common = [f"train.cpu_threads={args.threads}", f"rollout.max_new_tokens=[[0,{args.max_new_tokens}]]",
              *args.overrides]
    modes = {**MODES, "partial": ["rollout.staleness=1", f"rollout.partial_tokens={max(1, args.max_new_tokens // 4)}",
                                  "rollout.partial_groups=4"]}
    results = {name: run(common + extra, args.rollouts) for name, extra in modes.items()}
    base = results["sync"]["seconds_per_rollout"]
    print(f"{'mode':<14}{'s/rollout':>10}{'rollouts/s':>12}{'speed-up':>10}{'waited gen s':>14}{'gen beside s':>14}"
          f"{'train s':>9}")
    for name, r in results.items():
        print(f"{name:<14}{r['seconds_per_rollout']:>10.2f}{r['rollouts_per_s']:>12.3f}"
              f"{base / r['seconds_per_rollout']:>9.2f}x{r['waited_for_generation_s']:>14.2f}"
              f"{r['generation_beside_training_s']:>14.2f}{r['train_s']:>9.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": common, "rollouts": args.rollouts, "results": results}, indent=1))
    print(f"saved {args.out}")


if __name__ == "__main__":
    sys.exit(main())
