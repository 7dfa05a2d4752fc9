"""pass@k against its closed form and brute-force enumeration; cons@k voting, equivalence and ties."""

import itertools
from math import comb

import pytest

from r1mega.eval.passk import cons_at_k, majority_vote, pass_at_k
from r1mega.eval.report import markdown_table


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_matches_closed_form_and_enumeration(n):
    for c in range(n + 1):
        outcomes = [1] * c + [0] * (n - c)
        for k in range(1, n + 1):
            closed = 1 - comb(n - c, k) / comb(n, k)
            # the definition: the share of k-subsets of the n samples holding at least one correct one
            subsets = list(itertools.combinations(outcomes, k))
            enumerated = sum(any(s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(closed, abs=1e-12)
            assert pass_at_k(n, c, k) == pytest.approx(enumerated, abs=1e-12)


def test_pass_at_1_is_mean_correctness_and_large_n_is_stable():
    assert pass_at_k(16, 5, 1) == pytest.approx(5 / 16)
    assert pass_at_k(1000, 3, 64) == pytest.approx(1 - comb(997, 64) / comb(1000, 64), rel=1e-9)


def test_pass_at_k_rejects_bad_arguments():
    for n, c, k in ((4, 5, 1), (4, 1, 5), (4, 1, 0)):
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def eq(a, b):
    return a == b


def test_majority_vote_and_tie_rule():
    assert majority_vote(["3", "4", "4", "3", "4"], eq) == 1  # "4" has three votes; its first sample
    # 2-2 tie: the group whose first answer came first wins
    assert majority_vote(["7", "5", "5", "7"], eq) == 0
    assert majority_vote(["5", "7", "7", "5"], eq) == 0
    assert majority_vote([None, "9", None], eq) == 1  # no answer: no vote
    assert majority_vote([None, None], eq) is None


def test_cons_at_k_counts_the_voted_answer():
    assert cons_at_k(["1", "2", "2"], [1, 0, 0], same=eq) == 0.0  # the majority is wrong
    assert cons_at_k(["1", "2", "1"], [1, 0, 1], same=eq) == 1.0
    assert cons_at_k(["2", "1"], [0, 1], same=eq) == 0.0  # tie, first-seen "2" wins
    assert cons_at_k([None, None], [0, 0], same=eq) == 0.0


def test_cons_at_k_groups_math_verify_equivalent_answers():
    # "1/2", "0.5" and "\frac{1}{2}" are one vote (3) against "3" twice: the majority is right.
    answers = ["3", "1/2", "3", "0.5", "\\frac{1}{2}"]
    correct = [0, 1, 0, 1, 1]
    assert cons_at_k(answers, correct) == 1.0
    assert cons_at_k(answers, correct, same=eq) == 0.0  # by string equality "3" would win


def test_markdown_table_orders_and_formats_columns():
    table = markdown_table({"arith": {"response_length": 12.34, "cons@4": 0.5, "pass@4": 0.75, "pass@1": 0.25,
                                      "questions": 8}})
    header, _, row = table.splitlines()
    assert header == "| dataset | pass@1 | pass@4 | cons@4 | response_length | questions |"
    assert row == "| arith | 25.0 | 75.0 | 50.0 | 12.3 | 8 |"


class ScriptedEngine:
    """An engine whose k samples per prompt are fixed texts: the metrics can be worked out by hand."""

    def __init__(self, texts_by_prompt):
        self.texts = texts_by_prompt

    def generate(self, prompts, sampling):
        from r1mega.rollout.engine import Sample

        return [[Sample(prompt_ids=list(p), token_ids=[0] * (j + 1), text=t, finish_reason="stop")
                 for j, t in enumerate(self.texts[i])] for i, p in enumerate(prompts)]


class CharTokenizer:
    eos_token_id = 0

    def encode(self, text):
        return [ord(c) % 50 + 1 for c in text]


def test_evaluate_rows_on_scripted_samples():
    from r1mega.eval.run import EvalSettings, evaluate_rows
    from r1mega.rewards import ScoringPool

    a = lambda x: f"<think> ... </think><answer> {x} </answer>"  # noqa: E731
    engine = ScriptedEngine([[a("0.5"), a("3"), a("1/2"), "no answer"],  # 2 of 4 right; vote {1/2, 0.5} wins
                             [a("7"), a("8"), a("8"), a("7")]])  # 2 of 4 right; tie 7-8, first-seen 7 wins
    rows = [{"prompt": "q1", "answer": "\\frac{1}{2}"}, {"prompt": "q2", "answer": "8"}]
    with ScoringPool({"math_accuracy": 1.0}) as scorer:
        out = evaluate_rows(engine, CharTokenizer(), rows, EvalSettings(n=4, pass_k=[1, 2, 4]), scorer)
    assert out["pass@1"] == pytest.approx(0.5)
    assert out["pass@2"] == pytest.approx(1 - comb(2, 2) / comb(4, 2))
    assert out["pass@4"] == 1.0
    assert out["cons@4"] == pytest.approx(0.5)
    assert out["response_length"] == pytest.approx(2.5)  # lengths 1, 2, 3, 4 per question
