"""Each rank's planned peak training memory against its measured peak (the allocator's own events,
benchmarks/plan_vs_measured.py) under torchrun on 2 gloo processes, within 15%, at 2048 tokens."""

import pathlib
import sys
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))

from plan_vs_measured import WORLD, measured_ranks, predicted_peak  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


@pytest.mark.parametrize("layout", ["tp2", "ep2", "fsdp2", "pp2"])
def test_every_ranks_peak_within_15_percent(layout):
    args = SimpleNamespace(token_budget=2048, samples=32, prompt=8, response=120, modes=["none", "full"])
    measured = measured_ranks(layout, args)
    for mode in args.modes:
        for rank in range(WORLD):
            predicted = predicted_peak(mode, args, layout, rank)["total"]
            assert predicted == pytest.approx(measured[mode][rank], rel=0.15), (mode, rank)
