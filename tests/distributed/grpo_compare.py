"""Running GRPO as r1mega-train does, in one process or under torchrun, and comparing the metrics of two
runs: test_grpo_data_parallel.py's module docstring says how the tolerances are found (each comparison
measures the fp32 order noise of one process against a run micro-batched differently)."""

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

from helpers import free_port

WORKER = str(Path(__file__).with_name("grpo_worker.py"))
MEGATRON_WORKER = str(Path(__file__).with_name("megatron_grpo_worker.py"))
ROOT = str(Path(__file__).resolve().parents[2])
# A constant learning rate: the resume test stops a run by its step count, which a cosine schedule depends on.
# Rollouts of 4 questions x 4 samples, 2 optimizer steps each; a checkpoint every 2 rollouts.
ARGS = ["model.init=random", "data.train_size=64", "data.test_size=6", "algo.train_batch_size=4",
        "algo.group_size=4", "algo.ppo_mini_batch_size=2", "algo.lr=1e-4", "algo.schedule=constant", "algo.beta=0.1",
        "rollout.max_new_tokens=[[0,8]]", "train.cpu_threads=1", "train.progress=false", "train.tensorboard=false",
        "train.eval_every=8", "train.save_every=4", "train.eval_sampling.max_new_tokens=0", "data.hard_difficulty=null"]
TIMING = ("time/", "throughput/", "reward/score_time_s")
# Metrics of the engine's logprobs against the trainer's: a few fp32 ulps apart between generation batches
# (and, when the samples are stale, as far apart as the trainer's logprobs are).
ENGINE_LOGPROBS = ("rollout/logprob_mismatch", "rollout/mismatch_kl", "correction/")
# The held-out samples (data.test_size x train.eval_sampling.n) are drawn from weights that differ by the
# order noise, so a sampled token may flip where the draw falls within that noise of a boundary (seen on
# an AVX-512 machine: one sample's reward moved the mean by 9e-4): the sampled eval metrics may differ by
# one sample's share of a [0, 1] metric. The greedy ones must be equal.
SAMPLED_EVAL, EVAL_SAMPLES = "eval/", 6 * 4


def run_grpo(out_dir: Path, processes: int, *extra: str, worker: str = WORKER) -> None:
    launcher = ([sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}", "--max_restarts=0",
                 f"--master_port={free_port()}"] if processes > 1 else [sys.executable])
    # MASTER_PORT: the megatron backend starts a process group of one in one process
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0", PYTHONPATH=f"{ROOT}:{ROOT}/tests",
               MASTER_PORT=str(free_port()))
    # A session of its own: a run that hangs is killed with torchrun's workers, not only torchrun.
    proc = subprocess.Popen([*launcher, worker, str(out_dir), *ARGS, *extra], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"timed out after 300 s:\n{out[-4000:]}") from None
    assert proc.returncode == 0, out[-4000:]


def metrics_rows(out_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith(TIMING)} for row in rows]


NOISE_FACTOR = 4.0
MAX_NOISE = (1e-3, 1e-5)  # (relative on train/ statistics, absolute on the loss)
FLOOR = (1e-6, 1e-7)  # a spread that happens to be tiny still admits a few fp32 roundings
SPLIT = "algo.token_budget=40"  # two 17-token sequences per micro-batch: 4 micro-batches per mini-batch


def order_noise(a: list[dict], b: list[dict]) -> tuple[float, float]:
    """(largest relative difference of a train/ statistic but the loss, largest absolute one of the loss)
    between two runs that differ only in the order of their fp32 additions."""
    rel = loss = 0.0
    for x, y in zip(a, b, strict=True):
        for key, value in x.items():
            if key == "train/loss":
                loss = max(loss, abs(y[key] - value))
            elif key.startswith("train/") and value != 0:
                rel = max(rel, abs(y[key] - value) / abs(value))
    assert rel < MAX_NOISE[0] and loss < MAX_NOISE[1], (
        f"two micro-batch splits of one process differ by {rel:.1e} (relative) and {loss:.1e} on the loss: "
        "more than fp32 order noise")
    return rel, loss


def assert_same(expected: list[dict], got: list[dict], noise: tuple[float, float] = (0.0, 0.0),
                 exact: bool = False) -> None:
    rel, loss = (NOISE_FACTOR * n + floor for n, floor in zip(noise, FLOOR))
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for want, row in zip(expected, got):
        assert set(row) == set(want), set(row) ^ set(want)
        for key, value in want.items():
            if not exact and key.startswith(SAMPLED_EVAL) and not key.startswith("eval/greedy_"):
                ok = math.isclose(row[key], value, rel_tol=0, abs_tol=1 / EVAL_SAMPLES)
            elif exact or not key.startswith(("train/", *ENGINE_LOGPROBS)):
                ok = row[key] == value
            elif key.startswith(ENGINE_LOGPROBS):  # with stale samples, the trainer's noise moves them too
                ok = math.isclose(row[key], value, rel_tol=rel, abs_tol=1e-5)
            elif key == "train/loss":
                ok = math.isclose(row[key], value, rel_tol=0, abs_tol=loss)
            else:
                ok = math.isclose(row[key], value, rel_tol=rel)
            assert ok, f"step {want['step']} {key}: expected {value}, got {row[key]} (noise {noise})"
