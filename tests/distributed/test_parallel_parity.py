"""TP, EP, FSDP2 and their combinations on gloo: loss, gradients and the parameters after one SGD step
equal the single-process run of the same tiny model within 1e-5 (fp32)."""

import pytest

from helpers import run_world
from parity import check_step

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("kind", ["mla_moe", "gqa"])
def test_tp2(kind):
    run_world(check_step, 2, kind, {"tp": 2})


def test_fsdp2():
    run_world(check_step, 2, "mla_moe", {"dp_shard": 2})


def test_ep2_over_fsdp():
    run_world(check_step, 2, "mla_moe", {"dp_shard": 2, "ep": 2})


def test_tp2_ep2():
    run_world(check_step, 2, "mla_moe", {"tp": 2, "ep": 2})


def test_fsdp2_tp2():
    run_world(check_step, 4, "mla_moe", {"dp_shard": 2, "tp": 2})


def test_fsdp2_tp2_ep2_with_checkpointing():
    run_world(check_step, 4, "mla_moe", {"dp_shard": 2, "tp": 2, "ep": 2}, "selective")


def test_fsdp2_ep2_full_checkpointing():
    run_world(check_step, 2, "mla_moe", {"dp_shard": 2, "ep": 2}, "full")


def test_hsdp():
    run_world(check_step, 4, "gqa", {"dp_replicate": 2, "dp_shard": 2})
