"""The plan's peak training memory against the measured peak of a real CPU training step (the allocator's
own events, benchmarks/plan_vs_measured.py), within 15%, at a small micro-batch of 2048 tokens."""

import pathlib
import sys
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))

from plan_vs_measured import measured_peak, predicted_peak  # noqa: E402


@pytest.mark.parametrize("mode", ["none", "full"])
def test_peak_training_memory_within_15_percent(mode):
    args = SimpleNamespace(token_budget=2048, samples=16, prompt=8, response=120)
    measured = measured_peak(mode, args)
    predicted = predicted_peak(mode, args)["total"]
    assert predicted == pytest.approx(measured, rel=0.15)
