"""TP, EP, FSDP2 and their combinations on gloo: loss, gradients and the parameters after one SGD step
equal the single-process run of the same tiny model within 1e-5 (fp32).

The default suite keeps TP=2 on the MLA/MoE model and EP=2 over FSDP2; the other layouts are slow
(each starts its own gloo processes: about a minute each on 2 busy shared cores)."""

import pytest

from helpers import run_world
from parity import check_step

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("kind", ["mla_moe", pytest.param("gqa", marks=pytest.mark.slow)])
def test_tp2(kind):
    run_world(check_step, 2, kind, {"tp": 2})


@pytest.mark.slow
def test_fsdp2():
    run_world(check_step, 2, "mla_moe", {"dp_shard": 2})


def test_ep2_over_fsdp():
    run_world(check_step, 2, "mla_moe", {"dp_shard": 2, "ep": 2})


def test_ep2_routing_replay():
    # The replayed experts, not the router's, decide which rank computes a token's rows.
    run_world(check_step, 2, "mla_moe", {"dp_shard": 2, "ep": 2}, "none", 1e-5, False, True)


@pytest.mark.slow
def test_tp2_ep2_routing_replay():
    run_world(check_step, 2, "mla_moe", {"tp": 2, "ep": 2}, "none", 1e-5, False, True)


def test_ep2_with_experts_that_receive_no_rows():
    # The second rank's experts get no token: it must still join the backward's collectives.
    run_world(check_step, 2, "mla_moe", {"dp_shard": 2, "ep": 2}, "none", 1e-5, True)


@pytest.mark.slow
def test_tp2_ep2():
    run_world(check_step, 2, "mla_moe", {"tp": 2, "ep": 2})


@pytest.mark.slow
def test_fsdp2_tp2():
    run_world(check_step, 4, "mla_moe", {"dp_shard": 2, "tp": 2})


@pytest.mark.slow
def test_fsdp2_tp2_ep2_with_checkpointing():
    run_world(check_step, 4, "mla_moe", {"dp_shard": 2, "tp": 2, "ep": 2}, "selective")


@pytest.mark.slow
def test_fsdp2_ep2_full_checkpointing():
    run_world(check_step, 2, "mla_moe", {"dp_shard": 2, "ep": 2}, "full")


@pytest.mark.slow
def test_hsdp():
    run_world(check_step, 4, "gqa", {"dp_replicate": 2, "dp_shard": 2})
