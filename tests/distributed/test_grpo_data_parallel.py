"""GRPO under torchrun: 2 processes give the metrics of 1 process with the same global batch, data
parallel (FSDP2), tensor parallel (tp=2) or expert parallel (ep=2 over FSDP2), or with the policy as a
megatron-core GPTModel replicated by DDP (model.backend=megatron), and a run stopped at a checkpoint
resumes to the same metrics, under torchrun or in one process; megatron's own tensor parallelism (tp=2)
gives one process's metrics and resumes from its checkpoint; DAPO's dynamic sampling with rollout
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
loss; tp=2 differed from one process by 7e-5 and 2e-7, dp=2 and ep=2 by 1e-6 and 4e-8 (at lr 3e-4). The
runs use lr 1e-4: at 3e-3 Adam carried reordered sums past a routing tie within two steps (the split run
then differed by 1e-2), and at 3e-4 a token of the third rollout went to another expert under dp=2 on an
AVX-512 machine (2026-12-04: one expert load moved, the loss by 1e-4), discrete changes rather than noise.
The spread itself must stay below MAX_NOISE (a wrong micro-batch weighting is O(1)). The engine's
logprobs depend on the generation batch (each rank generates fewer prompts), so the logprob mismatch is
compared to a few fp32 ulps of a logprob (abs 1e-5). The bugs this guards against are O(1):
ranks drawing different prompts change the rewards; a loss normalised by local counts doubles the
gradient at 2 ranks, averaging instead of summing the ranks' gradients halves it; a gradient norm that
counts a replicated gradient once per rank grows by sqrt(2).

The megatron runs (megatron_grpo_worker.py shims megatron-core onto the CPU) compare 2 processes with 1
process of the same backend, within the noise of a one-process megatron run with another token budget.
Their small token budget packs each mini-batch into several micro-batches per rank, so that gradients
accumulate before DDP sums them; the reference is reset from the megatron policy every 2 rollouts. The
bugs: DDP's default average halves the gradient (the loss at the next step moves with it), summing the
accumulated gradient of every micro-batch counts the earlier ones twice, and expert loads left unsummed
give each rank other biases and the reported loads of half the batch.
"""

import shutil
from pathlib import Path

import pytest

from grpo_compare import MEGATRON_WORKER, SPLIT, assert_same, metrics_rows, order_noise, run_grpo

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """Uninterrupted 4-rollout (8-step) runs: one process (twice, micro-batched differently), and two
    under torchrun."""
    root = tmp_path_factory.mktemp("grpo_dp")
    run_grpo(root / "one", 1, "train.steps=8")
    run_grpo(root / "split", 1, "train.steps=8", SPLIT)
    run_grpo(root / "two", 2, "train.steps=8")
    return root


def _assert_distributed_checkpoint(out_dir: Path) -> None:
    assert (out_dir / "checkpoints" / "latest").read_text().strip() == "step_8"
    assert (out_dir / "checkpoints" / "step_8" / "policy" / ".metadata").is_file()


def test_two_processes_match_one(straight):
    one, two = metrics_rows(straight / "one"), metrics_rows(straight / "two")
    assert len({row["reward/mean"] for row in one}) > 1, "the reward should move, or the test compares nothing"
    assert_same(one, two, order_noise(one, metrics_rows(straight / "split")))
    _assert_distributed_checkpoint(straight / "two")


@pytest.mark.parametrize("layout", [["parallel.tp=2"], ["parallel.ep=2"],
                                    pytest.param(["parallel.tp=2", "parallel.ep=2"], marks=pytest.mark.slow)],
                         ids=["tp2", "ep2", "tp2_ep2"])
def test_tensor_and_expert_parallel_match_one_process(straight, tmp_path, layout):
    run_grpo(tmp_path, 2, "train.steps=8", *layout)
    one = metrics_rows(straight / "one")
    assert_same(one, metrics_rows(tmp_path), order_noise(one, metrics_rows(straight / "split")))
    _assert_distributed_checkpoint(tmp_path)


@pytest.mark.slow
def test_routing_replay_under_expert_parallel_matches_one_process(tmp_path):
    # The engines' routing records travel with the gathered rollouts and the sharded batch; every rank's
    # policy passes replay them (algo.routing_replay).
    replay = ("train.steps=8", "algo.routing_replay=true")
    run_grpo(tmp_path / "one", 1, *replay)
    run_grpo(tmp_path / "split", 1, *replay, SPLIT)
    run_grpo(tmp_path / "ep2", 2, *replay, "parallel.ep=2")
    one = metrics_rows(tmp_path / "one")
    assert len({row["reward/mean"] for row in one}) > 1, "the reward should move, or the test compares nothing"
    assert_same(one, metrics_rows(tmp_path / "ep2"), order_noise(one, metrics_rows(tmp_path / "split")))


@pytest.mark.slow  # a minute or more on a 2-core CPU (two torchrun launches)
def test_dapo_with_rollout_correction_two_processes_match_one(straight, tmp_path):
    # Dynamic sampling's rounds draw, generate and gather on every rank in step, and every rank keeps the same
    # groups; the correction's weights and masks come from the gathered batch.
    dapo = ("train.steps=8", "algo=dapo", "algo.correction.weights=token", "algo.correction.mask=sequence")
    run_grpo(tmp_path / "one", 1, *dapo)
    run_grpo(tmp_path / "two", 2, *dapo)
    one = metrics_rows(tmp_path / "one")
    assert any(row["dynamic_sampling/rounds"] > 1 for row in one), "no round was refilled: the test compares less"
    noise = order_noise(metrics_rows(straight / "one"), metrics_rows(straight / "split"))
    assert_same(one, metrics_rows(tmp_path / "two"), noise)


@pytest.mark.slow  # a minute or more on a 2-core CPU (two torchrun launches)
def test_one_step_off_two_processes_match_one(straight, tmp_path):
    # Each rank generates its share of the next batch on a background thread (no collective there); the
    # gather runs on the main thread after the training step, before the weights change.
    run_grpo(tmp_path / "one", 1, "train.steps=8", "rollout.staleness=1")
    run_grpo(tmp_path / "two", 2, "train.steps=8", "rollout.staleness=1")
    one = metrics_rows(tmp_path / "one")
    assert one[1]["rollout/logprob_mismatch"] > 1e-4, "the second rollout's samples should be one update stale"
    noise = order_noise(metrics_rows(straight / "one"), metrics_rows(straight / "split"))
    assert_same(one, metrics_rows(tmp_path / "two"), noise)
    _assert_distributed_checkpoint(tmp_path / "two")


@pytest.mark.slow  # a minute or more on a 2-core CPU (two torchrun launches)
def test_partial_rollouts_resume_under_torchrun(tmp_path):
    # Every rank keeps its own questions in flight (partial_rollouts_rank<r>.pt beside the shards): a run
    # stopped at a checkpoint and resumed trains on the same carried questions as one never stopped.
    partial = ("rollout.staleness=1", "rollout.partial_tokens=3", "rollout.partial_groups=2")
    run_grpo(tmp_path / "whole", 2, "train.steps=8", *partial)
    run_grpo(tmp_path / "cut", 2, "train.steps=4", *partial)
    assert (tmp_path / "cut" / "checkpoints" / "step_4" / "partial_rollouts_rank1.pt").is_file()
    run_grpo(tmp_path / "cut", 2, "train.steps=8", "train.resume=true", *partial)
    whole = metrics_rows(tmp_path / "whole")
    assert all(row["partial/carried"] == 2 for row in whole)
    assert_same(whole[2:], metrics_rows(tmp_path / "cut")[2:], exact=True)


def test_megatron_backend_two_processes_match_one(tmp_path):
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install r1mega[megatron])")
    # 20 tokens: one sample (a 9-token prompt and 8 new tokens at most) per micro-batch, so 8 per
    # mini-batch in one process, 4 per rank under torchrun
    megatron = ("train.steps=8", "model.backend=megatron", "algo.token_budget=20", "algo.ref_reset_every=4")
    run_grpo(tmp_path / "one", 1, *megatron, worker=MEGATRON_WORKER)
    run_grpo(tmp_path / "two", 2, *megatron, worker=MEGATRON_WORKER)
    run_grpo(tmp_path / "split", 1, *megatron, "algo.token_budget=40", worker=MEGATRON_WORKER)
    one = metrics_rows(tmp_path / "one")
    assert len({row["reward/mean"] for row in one}) > 1, "the reward should move, or the test compares nothing"
    assert any(key.startswith("moe/decoder.layers.") for key in one[0]), "the policy should be megatron's MoE"
    assert_same(one, metrics_rows(tmp_path / "two"), order_noise(one, metrics_rows(tmp_path / "split")))
    _assert_distributed_checkpoint(tmp_path / "two")


def test_megatron_tensor_parallel_matches_one_process_and_resumes(tmp_path):
    pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install r1mega[megatron])")
    # megatron-core's own tensor parallelism (its column/row-parallel layers, the vocabulary-parallel
    # embedding and fused loss over its tp group) on the tied Qwen2: the data are one process's, so only
    # fp32 summation order differs. The engine's weights are gathered from the shards every rollout, and
    # a checkpoint holds every rank's shards (a wrong gather or a lost shard changes the rewards).
    qwen = ("train.steps=6", "model.preset=tiny_qwen2", "model.backend=megatron", "algo.token_budget=20",
            "algo.ref_reset_every=4")
    run_grpo(tmp_path / "one", 1, *qwen, worker=MEGATRON_WORKER)
    run_grpo(tmp_path / "split", 1, *qwen, "algo.token_budget=40", worker=MEGATRON_WORKER)
    run_grpo(tmp_path / "tp", 2, *qwen, "parallel.tp=2", worker=MEGATRON_WORKER)
    one = metrics_rows(tmp_path / "one")
    assert len({row["reward/mean"] for row in one}) > 1, "the reward should move, or the test compares nothing"
    assert_same(one, metrics_rows(tmp_path / "tp"), order_noise(one, metrics_rows(tmp_path / "split")))
    run_grpo(tmp_path / "cut", 2, *qwen, "parallel.tp=2", "train.steps=4", worker=MEGATRON_WORKER)
    run_grpo(tmp_path / "cut", 2, *qwen, "parallel.tp=2", "train.resume=true", worker=MEGATRON_WORKER)
    assert_same(metrics_rows(tmp_path / "tp")[2:], metrics_rows(tmp_path / "cut")[2:], exact=True)


def test_resume_under_torchrun_and_in_one_process(straight, tmp_path):
    run_grpo(tmp_path / "two", 2, "train.steps=4")  # stops after 2 rollouts, at step 4, its last checkpoint
    shutil.copytree(tmp_path / "two", tmp_path / "one")
    run_grpo(tmp_path / "two", 2, "train.steps=8", "train.resume=true")
    run_grpo(tmp_path / "one", 1, "train.steps=8", "train.resume=true")  # the same checkpoint, resharded
    # The short run's 2 rollouts evaluated at its end (step 4); from the checkpoint on, nothing differs.
    assert_same(metrics_rows(straight / "two")[2:], metrics_rows(tmp_path / "two")[2:], exact=True)
    one = metrics_rows(straight / "one")
    assert_same(one[2:], metrics_rows(tmp_path / "one")[2:], order_noise(one, metrics_rows(straight / "split")))
