"""GRPO under torchrun: 2 processes give the metrics of 1 process with the same global batch, data
parallel (FSDP2), tensor parallel (tp=2) or expert parallel (ep=2 over FSDP2), or with the policy as a
megatron-core GPTModel replicated by DDP (model.backend=megatron), and a run stopped at a checkpoint
resumes to the same metrics, under torchrun or in one process; DAPO's dynamic sampling with rollout
correction, and one-step-off rollouts, too; partial rollouts resume under torchrun.

Every run goes through `train(cfg)` as r1mega-train does (grpo_worker.py adds a reward a random model
can earn) on the default tiny DeepSeek-V3 model (MLA, MoE with 8 routed experts); the 2-process runs
are real torchrun launches, so the trainer starts the process group from torchrun's environment. The
token budget packs each mini-batch into one micro-batch in one process, and into one per rank under
data parallelism: the statistics are weighted so as not to depend on that (policy_update.py).

Tolerances. Rollouts, rewards, accuracy, lengths, expert loads and held-out metrics must be equal: the
same questions sampled with per-sample seeds give the same tokens. The loss statistics and the gradient
norm differ only by the order of fp32 additions (gradients summed over micro-batches on each rank, then
over ranks; tensor parallelism splits the row-parallel sums, expert parallelism sends the experts' rows
and gathers them back), carried into later steps through Adam, which turns noise in nearly cancelling
gradient elements (a group's advantages sum to zero) into steps of the full learning rate. No bound
through four rollouts of Adam follows from the arithmetic, and one machine's figures are not a bound on
another's (a tolerance of 1e-4 measured here failed at 1.3e-4 elsewhere). So each comparison measures its
own noise floor in the same test: a second one-process run whose mini-batches are cut into micro-batches
differently (`algo.token_budget`) computes the same mathematics with fp32 additions in another order, on
this machine's kernels, through the same Adam dynamics. The parallel run may differ from one process by
NOISE_FACTOR times that spread: the largest relative difference of any `train/` statistic over the run,
and the largest absolute difference of the loss, which nearly cancels and so has no useful relative error.
Measured on the development machine: the split run's spread 8e-5 relative (the KL) and 4e-7 on the
loss; tp=2 differed from one process by 7e-5 and 2e-7, dp=2 and ep=2 by 1e-6 and 4e-8. The runs use lr
3e-4: at 3e-3 Adam carried reordered sums past a routing tie within two steps (the split run then
differed by 1e-2), a discrete change rather than noise.
The spread itself must stay below MAX_NOISE (a wrong micro-batch weighting is O(1)). The engine's
logprobs depend on the generation batch (each rank generates fewer prompts), so the logprob mismatch is
compared to a few fp32 ulps of a logprob (abs 1e-5). The bugs this guards against are O(1):
ranks drawing different prompts change the rewards; a loss normalised by local counts doubles the
gradient at 2 ranks, averaging instead of summing the ranks' gradients halves it; a gradient norm that
counts a replicated gradient once per rank grows by sqrt(2).

The megatron runs (megatron_grpo_worker.py shims megatron-core onto the CPU) compare 2 processes with 1
process of the same backend, within the noise of a one-process megatron run with another token budget. Their small token budget packs each mini-batch into
several micro-batches per rank, so that gradients accumulate before DDP sums them; the reference is
reset from the megatron policy every 2 rollouts. The bugs: DDP's default average halves the gradient (the
loss at the next step moves with it), summing the accumulated gradient of every micro-batch counts the
earlier ones twice, and expert loads left unsummed give each rank other biases and the reported loads
of half the batch.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import free_port

pytestmark = pytest.mark.distributed
WORKER = str(Path(__file__).with_name("grpo_worker.py"))
MEGATRON_WORKER = str(Path(__file__).with_name("megatron_grpo_worker.py"))
ROOT = str(Path(__file__).resolve().parents[2])
# A constant learning rate: the resume test stops a run by its step count, which a cosine schedule depends on.
# Rollouts of 4 questions x 4 samples, 2 optimizer steps each; a checkpoint every 2 rollouts.
ARGS = ["model.init=random", "data.train_size=64", "data.test_size=6", "algo.train_batch_size=4",
        "algo.group_size=4", "algo.ppo_mini_batch_size=2", "algo.lr=3e-4", "algo.schedule=constant", "algo.beta=0.1",
        "rollout.max_new_tokens=[[0,8]]", "train.cpu_threads=1", "train.progress=false", "train.tensorboard=false",
        "train.eval_every=8", "train.save_every=4", "train.eval_max_new_tokens=null", "data.hard_difficulty=null"]
TIMING = ("time/", "throughput/", "reward/score_time_s")
# Metrics of the engine's logprobs against the trainer's: a few fp32 ulps apart between generation batches
# (and, when the samples are stale, as far apart as the trainer's logprobs are).
ENGINE_LOGPROBS = ("rollout/logprob_mismatch", "rollout/mismatch_kl", "correction/")


def _run(out_dir: Path, processes: int, *extra: str, worker: str = WORKER) -> None:
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


def _rows(out_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith(TIMING)} for row in rows]


NOISE_FACTOR = 4.0
MAX_NOISE = (1e-3, 1e-5)  # (relative on train/ statistics, absolute on the loss)
FLOOR = (1e-6, 1e-7)  # a spread that happens to be tiny still admits a few fp32 roundings
SPLIT = "algo.token_budget=40"  # two 17-token sequences per micro-batch: 4 micro-batches per mini-batch


def _order_noise(a: list[dict], b: list[dict]) -> tuple[float, float]:
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


def _assert_same(expected: list[dict], got: list[dict], noise: tuple[float, float] = (0.0, 0.0),
                 exact: bool = False) -> None:
    rel, loss = (NOISE_FACTOR * n + floor for n, floor in zip(noise, FLOOR))
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for want, row in zip(expected, got):
        assert set(row) == set(want), set(row) ^ set(want)
        for key, value in want.items():
            if exact or not key.startswith(("train/", *ENGINE_LOGPROBS)):
                ok = row[key] == value
            elif key.startswith(ENGINE_LOGPROBS):  # with stale samples, the trainer's noise moves them too
                ok = math.isclose(row[key], value, rel_tol=rel, abs_tol=1e-5)
            elif key == "train/loss":
                ok = math.isclose(row[key], value, rel_tol=0, abs_tol=loss)
            else:
                ok = math.isclose(row[key], value, rel_tol=rel)
            assert ok, f"step {want['step']} {key}: expected {value}, got {row[key]} (noise {noise})"


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Uninterrupted 4-rollout (8-step) runs: one process (twice, micro-batched differently), and two
    under torchrun."""
    root = tmp_path_factory.mktemp("grpo_dp")
    _run(root / "one", 1, "train.steps=8")
    _run(root / "split", 1, "train.steps=8", SPLIT)
    _run(root / "two", 2, "train.steps=8")
    return root


def _assert_distributed_checkpoint(out_dir: Path) -> None:
    assert (out_dir / "checkpoints" / "latest").read_text().strip() == "step_8"
    assert (out_dir / "checkpoints" / "step_8" / "policy" / ".metadata").is_file()


def test_two_processes_match_one(straight):
    one, two = _rows(straight / "one"), _rows(straight / "two")
    assert len({row["reward/mean"] for row in one}) > 1, "the reward should move, or the test compares nothing"
    _assert_same(one, two, _order_noise(one, _rows(straight / "split")))
    _assert_distributed_checkpoint(straight / "two")


@pytest.mark.parametrize("layout", [["parallel.tp=2"], ["parallel.ep=2"],
                                    pytest.param(["parallel.tp=2", "parallel.ep=2"], marks=pytest.mark.slow)],
                         ids=["tp2", "ep2", "tp2_ep2"])
def test_tensor_and_expert_parallel_match_one_process(straight, tmp_path, layout):
    _run(tmp_path, 2, "train.steps=8", *layout)
    one = _rows(straight / "one")
    _assert_same(one, _rows(tmp_path), _order_noise(one, _rows(straight / "split")))
    _assert_distributed_checkpoint(tmp_path)


@pytest.mark.slow  # a minute or more on a 2-core CPU (two torchrun launches)
def test_dapo_with_rollout_correction_two_processes_match_one(straight, tmp_path):
    # Dynamic sampling's rounds draw, generate and gather on every rank in step, and every rank keeps the same
    # groups; the correction's weights and masks come from the gathered batch.
    dapo = ("train.steps=8", "algo=dapo", "algo.correction.weights=token", "algo.correction.mask=sequence")
    _run(tmp_path / "one", 1, *dapo)
    _run(tmp_path / "two", 2, *dapo)
    one = _rows(tmp_path / "one")
    assert any(row["dynamic_sampling/rounds"] > 1 for row in one), "no round was refilled: the test compares less"
    _assert_same(one, _rows(tmp_path / "two"), _order_noise(_rows(straight / "one"), _rows(straight / "split")))


@pytest.mark.slow  # a minute or more on a 2-core CPU (two torchrun launches)
def test_one_step_off_two_processes_match_one(straight, tmp_path):
    # Each rank generates its share of the next batch on a background thread (no collective there); the
    # gather runs on the main thread after the training step, before the weights change.
    _run(tmp_path / "one", 1, "train.steps=8", "rollout.staleness=1")
    _run(tmp_path / "two", 2, "train.steps=8", "rollout.staleness=1")
    one = _rows(tmp_path / "one")
    assert one[1]["rollout/logprob_mismatch"] > 1e-4, "the second rollout's samples should be one update stale"
    _assert_same(one, _rows(tmp_path / "two"), _order_noise(_rows(straight / "one"), _rows(straight / "split")))
    _assert_distributed_checkpoint(tmp_path / "two")


@pytest.mark.slow  # a minute or more on a 2-core CPU (two torchrun launches)
def test_partial_rollouts_resume_under_torchrun(tmp_path):
    # Every rank keeps its own questions in flight (partial_rollouts_rank<r>.pt beside the shards): a run
    # stopped at a checkpoint and resumed trains on the same carried questions as one never stopped.
    partial = ("rollout.staleness=1", "rollout.partial_tokens=3", "rollout.partial_groups=2")
    _run(tmp_path / "whole", 2, "train.steps=8", *partial)
    _run(tmp_path / "cut", 2, "train.steps=4", *partial)
    assert (tmp_path / "cut" / "checkpoints" / "step_4" / "partial_rollouts_rank1.pt").is_file()
    _run(tmp_path / "cut", 2, "train.steps=8", "train.resume=true", *partial)
    whole = _rows(tmp_path / "whole")
    assert all(row["partial/carried"] == 2 for row in whole)
    _assert_same(whole[2:], _rows(tmp_path / "cut")[2:], exact=True)


def test_megatron_backend_two_processes_match_one(tmp_path):
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install r1mega[megatron])")
    # 20 tokens: one sample (a 9-token prompt and 8 new tokens at most) per micro-batch, so 8 per
    # mini-batch in one process, 4 per rank under torchrun
    megatron = ("train.steps=8", "model.backend=megatron", "algo.token_budget=20", "algo.ref_reset_every=4")
    _run(tmp_path / "one", 1, *megatron, worker=MEGATRON_WORKER)
    _run(tmp_path / "two", 2, *megatron, worker=MEGATRON_WORKER)
    _run(tmp_path / "split", 1, *megatron, "algo.token_budget=40", worker=MEGATRON_WORKER)
    one = _rows(tmp_path / "one")
    assert len({row["reward/mean"] for row in one}) > 1, "the reward should move, or the test compares nothing"
    assert any(key.startswith("moe/decoder.layers.") for key in one[0]), "the policy should be megatron's MoE"
    _assert_same(one, _rows(tmp_path / "two"), _order_noise(one, _rows(tmp_path / "split")))
    _assert_distributed_checkpoint(tmp_path / "two")


def test_resume_under_torchrun_and_in_one_process(straight, tmp_path):
    _run(tmp_path / "two", 2, "train.steps=4")  # stops after 2 rollouts, at step 4, its last checkpoint
    shutil.copytree(tmp_path / "two", tmp_path / "one")
    _run(tmp_path / "two", 2, "train.steps=8", "train.resume=true")
    _run(tmp_path / "one", 1, "train.steps=8", "train.resume=true")  # the same checkpoint, resharded
    # The short run's 2 rollouts evaluated at its end (step 4); from the checkpoint on, nothing differs.
    _assert_same(_rows(straight / "two")[2:], _rows(tmp_path / "two")[2:], exact=True)
    one = _rows(straight / "one")
    _assert_same(one[2:], _rows(tmp_path / "one")[2:], _order_noise(one, _rows(straight / "split")))
