"""GRPO under pipeline parallelism: torchrun runs at parallel.pp=2, alone and with tp=2, ep=2 or dp=2
(4 processes), give the metrics of one process, for the tiny DeepSeek-V3 (MLA + MoE, untied) and the
tiny Qwen2-style model (dense, tied embeddings split over the first and last stage); the engines of
every rank then generate greedily exactly what the one-process run's engine generates (the weight
sync streamed every stage's weights to every rank); a pp=2 checkpoint resumes in one process, and a
data-parallel one at pp=2, to the same next step.

Tolerances as test_grpo_data_parallel.py's (its docstring): rollouts, rewards, lengths, expert loads and
held-out metrics equal; the loss statistics and gradient norm within NOISE_FACTOR times the spread
between two one-process runs micro-batched differently (a pipeline changes no arithmetic of a
micro-batch, only where its layers run, but the tied embedding's gradient adds its input and output
parts in another order, and the grad norm adds the stages' squares). Bugs this guards against are
O(1): a stage reading the wrong positions or shared-prompt layout changes the logprobs (and, through
the KL, the loss); losing the tied embedding's output gradient, or counting it twice in the norm, moves
the grad norm; unsummed expert loads change the biases and the reported loads; a stage missing from
the weight sync makes the engines generate from stale layers.

Runs: 2 rollouts of 2 optimizer steps (4 steps); the default suite runs the DeepSeek model at pp=2,
the rest is marked slow.
"""

import json
from pathlib import Path

import pytest

from grpo_compare import SPLIT, assert_same, metrics_rows, order_noise, run_grpo

pytestmark = pytest.mark.distributed
GREEDY = str(Path(__file__).with_name("grpo_greedy_worker.py"))
STEPS = "train.steps=4"
MODELS = {"deepseek": "model.preset=tiny_deepseek_v3", "qwen2": "model.preset=tiny_qwen2"}


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """Per model, lazily: the one-process run, and its noise floor (a run micro-batched differently)."""
    root, done = tmp_path_factory.mktemp("grpo_pp"), {}

    def get(model: str) -> tuple[list[dict], tuple[float, float], Path]:
        if model not in done:
            run_grpo(root / model / "one", 1, STEPS, MODELS[model], worker=GREEDY)
            run_grpo(root / model / "split", 1, STEPS, MODELS[model], SPLIT)
            one = metrics_rows(root / model / "one")
            assert len({row["reward/mean"] for row in one}) > 1, "the reward should move, or the test compares nothing"
            done[model] = (one, order_noise(one, metrics_rows(root / model / "split")), root / model / "one")
        return done[model]

    return get


def _greedy(out_dir: Path, processes: int) -> list:
    return [json.loads((out_dir / f"greedy_rank{r}.json").read_text()) for r in range(processes)]


def _check_pipelined(single, model: str, out_dir: Path, processes: int, *layout: str) -> None:
    run_grpo(out_dir, processes, STEPS, MODELS[model], "parallel.pp=2", *layout, worker=GREEDY)
    one, noise, one_dir = single(model)
    assert_same(one, metrics_rows(out_dir), noise)
    want = _greedy(one_dir, 1)[0]
    assert any(want), "the engine should generate something"
    for rank, got in enumerate(_greedy(out_dir, processes)):
        assert got == want, f"rank {rank}'s engine generates other tokens than one process's"
    assert (out_dir / "checkpoints" / "step_4" / "policy" / ".metadata").is_file()


def test_pipeline_matches_one_process(single, tmp_path):
    _check_pipelined(single, "deepseek", tmp_path, 2)


@pytest.mark.slow
def test_pipeline_tied_embeddings_match_one_process(single, tmp_path):
    _check_pipelined(single, "qwen2", tmp_path, 2)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["deepseek", "qwen2"])
def test_interleaved_schedule_matches_one_process(single, tmp_path, model):
    _check_pipelined(single, model, tmp_path, 2, "parallel.pp_schedule=interleaved_1f1b",
                     "parallel.pp_stages_per_rank=2")


@pytest.mark.slow
@pytest.mark.parametrize("model,layout", [("deepseek", "parallel.tp=2"), ("deepseek", "parallel.ep=2"),
                                          ("deepseek", "parallel.dp_shard=2"), ("qwen2", "parallel.tp=2"),
                                          ("qwen2", "parallel.dp_shard=2")],
                         ids=["deepseek_tp2", "deepseek_ep2", "deepseek_dp2", "qwen2_tp2", "qwen2_dp2"])
def test_pipeline_with_other_dims_matches_one_process(single, tmp_path, model, layout):
    _check_pipelined(single, model, tmp_path, 4, layout)


@pytest.mark.slow
@pytest.mark.parametrize("model,saved,resumed", [("deepseek", (2, "parallel.pp=2"), (1,)),
                                                 ("qwen2", (2, "parallel.pp=2"), (1,)),
                                                 ("qwen2", (2,), (2, "parallel.pp=2"))],
                         ids=["deepseek_pp2_to_one", "qwen2_pp2_to_one", "qwen2_dp2_to_pp2"])
def test_checkpoint_resumes_at_another_layout(single, tmp_path, model, saved, resumed):
    run_grpo(tmp_path, saved[0], "train.steps=2", MODELS[model], *saved[1:])  # one rollout, its checkpoint at step 2
    run_grpo(tmp_path, resumed[0], STEPS, MODELS[model], "train.resume=true", *resumed[1:])
    one, noise, _ = single(model)
    # the short run evaluated at its end (step 2); from the checkpoint on, nothing differs
    assert_same(one[1:], metrics_rows(tmp_path)[1:], noise)
