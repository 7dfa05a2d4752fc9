"""The scoring pool: same scores in workers as in-process, and it survives rewards that raise, hang
or kill their worker (each such sample scores 0 and is counted)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import reward_helpers  # noqa: E402,F401  (registers the misbehaving rewards here; workers import it by name)

from r1mega.rewards import ScoreResult, ScoringPool, get_reward  # noqa: E402

HELPERS = ["reward_helpers"]
COMPLETIONS = ["<think>a</think><answer>\\frac{1}{2}</answer>", "<think>a</think><answer>3</answer>", "nothing"]
SAMPLES = [{"answer": "0.5"}, {"answer": "4"}, {"answer": "1"}]


def reference(components, completions, samples):
    """The weighted sum computed directly from the registered functions."""
    return [sum(w * get_reward(n)(c, s).score for n, w in components) for c, s in zip(completions, samples)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_scores_match_direct_calls(num_workers):
    components = [("math_accuracy", 1.0), ("format_r1_zero", 0.5), ("test_length", 0.01)]
    with ScoringPool(components, num_workers, timeout=30, modules=HELPERS) as pool:
        result = pool.score(COMPLETIONS, SAMPLES)
    assert result.rewards == pytest.approx(reference(components, COMPLETIONS, SAMPLES))
    assert result.components["math_accuracy"] == [1.0, 0.0, 0.0]
    assert result.metrics["reward/errors"] == 0 and result.metrics["reward/timeouts"] == 0
    assert result.metrics["reward/format_r1_zero"] == pytest.approx(2 / 3)
    assert "differs" in result.reasons["math_accuracy"][1]


def test_in_process_catches_exceptions():
    with ScoringPool([("test_raises", 1.0)], 0, modules=HELPERS) as pool:
        result = pool.score(["fine", "raise", "fine"], [{}] * 3)
    assert result.rewards == [1.0, 0.0, 1.0] and result.metrics["reward/errors"] == 1
    assert "boom" in result.reasons["test_raises"][1]


def test_pool_survives_raise_hang_and_exit():
    components = [("test_raises", 1.0), ("test_hangs", 1.0), ("test_exits", 1.0)]
    completions = ["ok", "raise", "hang", "exit", "ok", "exit", "ok"]
    with ScoringPool(components, 2, timeout=3.0, modules=HELPERS) as pool:
        result = pool.score(completions, [{}] * len(completions))
        # Every reward scores 1 except the one that misbehaved on that completion.
        assert result.rewards == [3.0, 2.0, 2.0, 2.0, 3.0, 2.0, 3.0]
        assert result.metrics["reward/errors"] == 3  # one raise, two worker deaths
        assert result.metrics["reward/timeouts"] == 1
        assert "timeout" in result.reasons["test_hangs"][2]
        assert "died" in result.reasons["test_exits"][3]
        # The dead and hung workers were replaced: the pool keeps working at full size.
        again = pool.score(["ok", "ok"], [{}, {}])
        assert again.rewards == [3.0, 3.0] and len(pool._workers) == 2
        assert all(w.process.is_alive() for w in pool._workers)


def test_concat_equals_scoring_one_batch():
    # Data-parallel ranks score their shares apart; the joined result must be the one-batch result.
    components = [("math_accuracy", 1.0), ("format_r1_zero", 0.5), ("test_raises", 1.0)]
    completions, samples = [*COMPLETIONS, "raise"], [*SAMPLES, {"answer": "2"}]
    with ScoringPool(components, 0, modules=HELPERS) as pool:
        whole = pool.score(completions, samples)
        parts = [pool.score(completions[:1], samples[:1]), pool.score(completions[1:], samples[1:])]
    joined = ScoreResult.concat(parts)
    assert (joined.rewards, joined.components, joined.reasons) == (whole.rewards, whole.components, whole.reasons)
    timeless = lambda m: {k: v for k, v in m.items() if k != "reward/score_time_s"}  # noqa: E731
    assert timeless(joined.metrics) == timeless(whole.metrics)
    assert joined.metrics["reward/score_time_s"] == max(p.metrics["reward/score_time_s"] for p in parts)
