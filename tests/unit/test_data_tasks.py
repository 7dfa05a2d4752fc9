"""Synthetic tasks: deterministic per seed, held-out split disjoint from training, ground truth checked
by Python's own evaluation of the expressions, and demonstrations in the R1-Zero output format."""

import json
import random
import re
import subprocess
import sys
from collections import Counter
from fractions import Fraction

import pytest

from r1mega.data.tasks import demonstration, make_task_dataset

TASKS = ["arithmetic", "countdown"]
DEMO = re.compile(r"^<think> (.+) </think><answer> (.+) </answer>$", re.S)


def exact(expression: str) -> Fraction:
    """Python's evaluation of an integer expression, each literal made a Fraction so / is exact."""
    assert re.fullmatch(r"[\d\s+\-*/()]+", expression), expression
    return eval(re.sub(r"\d+", lambda m: f"Fraction({m.group()})", expression), {"Fraction": Fraction})


@pytest.mark.parametrize("name", TASKS)
def test_deterministic_per_seed(name):
    first = make_task_dataset(name, split="train", size=50, difficulty=2, seed=3)
    assert first == make_task_dataset(name, split="train", size=50, difficulty=2, seed=3)
    assert first != make_task_dataset(name, split="train", size=50, difficulty=2, seed=4)


def test_same_dataset_in_a_fresh_process():
    code = ("from r1mega.data.tasks import make_task_dataset as m; import json; "
            "print(json.dumps(m('countdown', 'test', 20, 3, 9)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONHASHSEED": "123", "PYTHONPATH": ":".join(sys.path)}).stdout
    assert json.loads(out) == make_task_dataset("countdown", "test", 20, 3, 9)


@pytest.mark.parametrize("name", TASKS)
@pytest.mark.parametrize("difficulty", [1, 3])
def test_held_out_never_overlaps_train(name, difficulty):
    train = {s["prompt"] for seed in (0, 1) for s in make_task_dataset(name, "train", 800, difficulty, seed)}
    test = {s["prompt"] for seed in (0, 2) for s in make_task_dataset(name, "test", 100, difficulty, seed)}
    assert train and test and not train & test


def test_small_question_space_still_fills_the_split():
    # Level-1 arithmetic has 200 questions, about 20 of them held out: repeats come in, nothing leaks.
    test = make_task_dataset("arithmetic", "test", 60, 1, 0)
    train = {s["prompt"] for s in make_task_dataset("arithmetic", "train", 300, 1, 0)}
    assert len(test) == 60 and len({s["prompt"] for s in test}) < 60
    assert not train & {s["prompt"] for s in test}


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4, 5])
def test_arithmetic_ground_truth(difficulty):
    samples = make_task_dataset("arithmetic", "train", 200, difficulty, seed=difficulty)
    for s in samples:
        assert s["task"] == "arithmetic" and s["difficulty"] == difficulty
        assert s["prompt"] == f"Compute {s['expression']}"
        assert int(s["answer"]) == eval(s["expression"])  # integer-only + - *: Python evaluates exactly
        assert len(re.findall(r"\d+", s["expression"])) == 2 + (difficulty - 1) // 2
    if difficulty == 1:
        assert all("*" not in s["expression"] for s in samples)
    if difficulty >= 3:
        assert any("(" in s["expression"] for s in samples)


@pytest.mark.parametrize("difficulty", [2, 4])  # from 3 operands on, a held-out chain reuses seen steps
def test_chain_ground_truth_and_held_out_steps_are_seen_in_training(difficulty):
    train = make_task_dataset("chain", "train", 3000, difficulty, seed=0)
    test = make_task_dataset("chain", "test", 200, difficulty, seed=0)
    for s in train + test:
        assert int(s["answer"]) == eval(s["expression"])  # left to right, + and - only
        assert re.fullmatch(r"Compute \d([+-]\d){%d}" % difficulty, s["prompt"])

    def facts(sample):  # "running total op digit" of each step
        numbers, ops = re.findall(r"\d", sample["expression"]), re.findall(r"[+-]", sample["expression"])
        total, out = int(numbers[0]), []
        for op, digit in zip(ops, numbers[1:]):
            out.append((total, op, int(digit)))
            total = total + int(digit) if op == "+" else total - int(digit)
        return out

    seen = {fact for s in train for fact in facts(s)}
    test_facts = [fact for s in test for fact in facts(s)]
    assert sum(f in seen for f in test_facts) / len(test_facts) > 0.95


@pytest.mark.parametrize("difficulty", [1, 2, 3, 4])
def test_countdown_solution_reaches_target_with_the_numbers(difficulty):
    for s in make_task_dataset("countdown", "test", 150, difficulty, seed=difficulty):
        assert exact(s["answer"]) == s["target"] and 1 <= s["target"] <= 999
        assert sorted(int(n) for n in re.findall(r"\d+", s["answer"])) == sorted(s["numbers"])
        assert len(s["numbers"]) == min(2 + difficulty, 6)
        assert s["prompt"].endswith(f"equal to {s['target']}")
        assert ", ".join(map(str, s["numbers"])) in s["prompt"]


@pytest.mark.parametrize("name", TASKS)
def test_demonstrations(name):
    samples = make_task_dataset(name, "train", 300, 2, seed=0)
    rng = random.Random(0)

    def correct(sample, answer):
        if name == "arithmetic":
            return answer == sample["answer"]
        return exact(answer) == sample["target"]

    for s in samples[:100]:
        match = DEMO.match(demonstration(s, rng))
        assert match and correct(s, match.group(2)), s
    for s in samples[:100]:
        match = DEMO.match(demonstration(s, rng, wrong_rate=1.0))
        assert match and not correct(s, match.group(2)), s
    for s in samples[:100]:
        assert not DEMO.match(demonstration(s, rng, bad_format_rate=1.0))
    outcome = Counter()
    for s in samples:
        match = DEMO.match(demonstration(s, rng, wrong_rate=0.5, bad_format_rate=0.2))
        outcome["bad format" if not match else "right" if correct(s, match.group(2)) else "wrong"] += 1
    assert 40 <= outcome["bad format"] <= 80 and 90 <= outcome["wrong"] <= 150, outcome


def test_demonstrations_carry_reflective_words():
    rng = random.Random(1)
    text = " ".join(demonstration(s, rng) for name in TASKS for s in make_task_dataset(name, "train", 200, 2, 0))
    for word in ("wait", "wrong", "retry", "verify", "check"):
        assert word in text.lower(), word


def test_unknown_task_and_bad_arguments():
    with pytest.raises(ValueError, match="unknown task 'sudoku'"):
        make_task_dataset("sudoku")
    with pytest.raises(ValueError, match="split"):
        make_task_dataset("arithmetic", split="validation")
    with pytest.raises(ValueError, match="difficulty"):
        make_task_dataset("arithmetic", difficulty=0)
