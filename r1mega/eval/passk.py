"""pass@k and cons@k from per-sample correctness and extracted answers: pure functions, no model.

pass@k, the unbiased estimator of Chen et al. (2021) from n samples of which c are correct:

    pass@k = 1 - C(n - c, k) / C(n, k)        (1 when n - c < k)

computed as 1 - prod_{i = n-c+1..n} (1 - k / i), which never forms the (huge) binomials. pass@1 is
then c / n: the mean correctness over the k sampled responses, as DeepSeek-R1 reports it.

cons@k (majority voting): the answers of a question's samples are grouped into votes, two answers
sharing a vote when `same(a, b)` holds (math-verify equivalence by default, so "1/2" and "0.5" are one
vote). Each new answer joins the first existing vote whose representative (its first answer) it
matches, else opens a new vote. Samples with no extractable answer do not vote. The most voted group
wins; ties go to the group whose first answer came earliest in sample order (deterministic, and the
same as taking the first-seen answer among the tied ones). The question counts as solved when the
winning group's representative sample is correct; a question where no sample gave an answer counts 0.

Deliberately left out: weighting votes by reward-model scores or by log-probability.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one question with `c` correct among `n` samples (k <= n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def majority_vote(answers: Sequence[Optional[str]], same: Callable[[str, str], bool]) -> Optional[int]:
    """Index of the sample whose answer wins the vote (the first of its group); None if none answered."""
    groups: list[list[int]] = []  # each a list of sample indices, the first being the representative
    for i, answer in enumerate(answers):
        if answer is None:
            continue
        for group in groups:
            if same(answers[group[0]], answer):
                group.append(i)
                break
        else:
            groups.append([i])
    if not groups:
        return None
    # max keeps the first of equal counts, and groups are in order of their first answer: the tie rule
    return max(groups, key=len)[0]


def cons_at_k(answers: Sequence[Optional[str]], correct: Sequence[float],
              same: Callable[[str, str], bool] | None = None) -> float:
    """1.0 when the majority-voted answer of one question's samples is correct, else 0.0."""
    if len(answers) != len(correct):
        raise ValueError(f"{len(answers)} answers but {len(correct)} correctness values")
    if same is None:
        from r1mega.rewards.math_accuracy import answers_match

        same = answers_match
    winner = majority_vote(answers, same)
    return 0.0 if winner is None else float(correct[winner] >= 1.0)
