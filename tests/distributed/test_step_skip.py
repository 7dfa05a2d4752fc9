"""update_policy skips a step on every rank when the loss or the gradient norm is not finite on any:
the ranks' sharded or replicated parameters must take the same optimizer steps."""

import math

import pytest
import torch

from helpers import run_world
from r1mega.trainers.policy_update import _finite_on_every_rank

pytestmark = pytest.mark.distributed


def _check(rank: int, world: int) -> None:
    norm = torch.tensor(1.0)
    assert _finite_on_every_rank(1.0, norm, "cpu")
    assert not _finite_on_every_rank(math.nan if rank == 1 else 1.0, norm, "cpu")  # one rank's loss
    assert not _finite_on_every_rank(1.0, torch.tensor(math.inf if rank == 0 else 1.0), "cpu")


def test_a_non_finite_rank_makes_every_rank_skip():
    run_world(_check, 2)
