"""r1mega.plan's per-rank parameter, gradient and optimizer bytes equal what real gloo ranks hold after
one AdamW step of the tiny model, exactly, at 1 process, tp=2, ep=2 and fsdp=2 (and pp=2 on the
stage modules r1mega.parallel.pipeline builds). The planner runs here, in the test process, on a fake
process group and the meta device; the ranks measure their own tensors (plan_worker.py)."""

import json
from types import SimpleNamespace

import pytest

from helpers import run_world
from plan_worker import measure_layout

from r1mega.models.config import tiny_deepseek_v3
from r1mega.plan.shards import shard_bytes

pytestmark = pytest.mark.distributed

LAYOUTS = {"tp2": {"tp": 2}, "ep2": {"dp_shard": 2, "ep": 2}, "fsdp2": {"dp_shard": 2}}


def _parallel(**kw):
    base = dict(dp_shard=-1, dp_replicate=1, tp=1, ep=1, pp=1, activation_checkpointing="none")
    return SimpleNamespace(**{**base, **kw})


def _check(measured: dict, rank: int, world: int, kw: dict) -> None:
    predicted = shard_bytes(tiny_deepseek_v3(), _parallel(**kw), world, rank)
    assert predicted.params == measured["params"]
    assert predicted.params_numel == measured["params_numel"]
    assert predicted.grads == measured["grads"]
    assert predicted.optimizer == measured["optimizer"]
    assert predicted.optimizer_host == measured["optimizer_host"]


def test_one_process(tmp_path):
    measure_layout(0, 1, {}, str(tmp_path))
    _check(json.loads((tmp_path / "rank0.json").read_text()), 0, 1, {})


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_two_ranks(layout, tmp_path):
    kw = LAYOUTS[layout]
    run_world(measure_layout, 2, kw, str(tmp_path))
    for rank in range(2):
        _check(json.loads((tmp_path / f"rank{rank}.json").read_text()), rank, 2, kw)


def test_uneven_fsdp_over_three_ranks(tmp_path):
    # hidden 128 and vocab 512 split 43/43/42 rows: FSDP2 pads every rank's chunk to the largest
    run_world(measure_layout, 3, {"dp_shard": 3}, str(tmp_path))
    for rank in range(3):
        _check(json.loads((tmp_path / f"rank{rank}.json").read_text()), rank, 3, {"dp_shard": 3})


def test_pipeline_two_stages(tmp_path):
    from plan_worker import measure_pipeline

    run_world(measure_pipeline, 2, {"pp": 2}, str(tmp_path))
    for rank in range(2):
        _check(json.loads((tmp_path / f"rank{rank}.json").read_text()), rank, 2, {"pp": 2})
