"""The embedded default's pretraining corpus: chain questions whose running totals stay digits, written
in the strategies of the config's mixture ("direct", "steps", "check"), slipping at the config's rate.

Each written solution is read back here with its own small parser (not strategies.py's code): every
"a+b=v" it states is checked against Python's arithmetic, and the checks and corrections of the
"check" strategy against the slips they follow."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest

from r1mega.config import DataConfig, ModelConfig
from r1mega.data.tasks import demonstration, make_task_dataset
from r1mega.data.tasks.strategies import write
from r1mega.data.tokenizer import build_default_tokenizer
from r1mega.trainers.base_model import _examples

EQUATION = re.compile(r"(-?\d+)([+-])(\d+)=(-?\d+)")
DEMO = re.compile(r"<think> (.*) </think><answer> (-?\d+) </answer>")


def strategy_of(text: str) -> str:
    """The strategy a demonstration reads as: checks, equations without checks, or no working."""
    if ", check: " in text:
        return "check"
    return "steps" if EQUATION.search(text) else "direct"


def true_value(a: str, op: str, b: str) -> int:
    return int(a) + int(b) if op == "+" else int(a) - int(b)


@pytest.mark.parametrize("difficulty", [1, 3, 5])
def test_chain_running_totals_stay_digits(difficulty):
    for s in make_task_dataset("chain", "train", 500, difficulty, seed=1):
        expression = s["expression"]
        assert re.fullmatch(r"\d([+-]\d){%d}" % difficulty, expression) and s["prompt"] == f"Compute {expression}"
        total = int(expression[0])
        for op, digit in zip(expression[1::2], expression[2::2]):
            total = true_value(str(total), op, digit)
            assert 0 <= total <= 9, expression
        assert int(s["answer"]) == total == eval(expression)


def test_solutions_without_slips_are_right_in_every_step():
    rng = random.Random(0)
    for s in make_task_dataset("chain", "train", 300, 4, seed=0):
        for strategy in ("steps", "check"):
            thought, answer = DEMO.fullmatch(demonstration(s, rng, strategy=strategy)).groups()
            equations = EQUATION.findall(thought)
            assert all(true_value(a, op, b) == int(v) for a, op, b, v in equations), thought
            assert answer == s["answer"]
            assert len(equations) == (4 if strategy == "steps" else 8)  # each operation, and its check
            assert "Wait" not in thought and "wrong" not in thought
        thought, answer = DEMO.fullmatch(demonstration(s, rng, strategy="direct")).groups()
        assert answer == s["answer"] and not EQUATION.search(thought)


def test_slips_carry_on_in_steps_and_are_caught_by_checks():
    rng = random.Random(1)
    for s in make_task_dataset("chain", "train", 300, 3, seed=0):
        thought, answer = DEMO.fullmatch(demonstration(s, rng, strategy="steps", slip_rate=1.0)).groups()
        equations = EQUATION.findall(thought)
        assert all(true_value(a, op, b) != int(v) for a, op, b, v in equations)  # every operation slipped
        assert [a for a, *_ in equations[1:]] == [v for *_, v in equations[:-1]]  # and the next goes on from it
        assert answer == equations[-1][3]

        thought, answer = DEMO.fullmatch(demonstration(s, rng, strategy="check", slip_rate=1.0)).groups()
        assert answer == s["answer"]  # every slip caught and redone
        sentences = thought.removesuffix(".").split(". ")
        caught = [i for i, sentence in enumerate(sentences) if sentence.endswith(", wrong")]
        assert len(caught) == 3  # one per operation
        for i in caught:  # slip, its failed check; then "Wait", the redone operation and its check
            (slip, check), (redo, recheck) = EQUATION.findall(sentences[i]), EQUATION.findall(sentences[i + 1])[:2]
            assert true_value(*slip[:3]) != int(slip[3]) and true_value(*redo[:3]) == int(redo[3])
            assert check[0] == slip[3] and int(check[3]) != int(slip[0])  # the inverse does not give a back
            assert recheck[0] == redo[3] and recheck[3] == redo[0]
            assert sentences[i].endswith(f" vs {slip[0]}, wrong") and sentences[i + 1].startswith("Wait, redo: ")
            assert f" vs {redo[0]}, right" in sentences[i + 1]


def test_pretraining_corpus_follows_the_configured_mixture_and_slip_rate():
    mixture, slip_rate = {"direct": 0.6, "steps": 0.25, "check": 0.15}, 0.1
    config = ModelConfig(base_strategies=mixture, base_slip_rate=slip_rate, base_difficulties=[2, 3, 4, 5])
    tokenizer = build_default_tokenizer()
    examples = _examples(config, tokenizer, DataConfig(task="chain", train_size=4096, template="plain"), seed=0)
    texts = [tokenizer.decode(response[:-1]) for _, response in examples]
    assert len(texts) == 4096
    counts = Counter(strategy_of(t) for t in texts)
    for strategy, share in mixture.items():  # 4 binomial standard deviations at n = 4096 (< 0.031)
        assert abs(counts[strategy] / len(texts) - share) < 4 * (share * (1 - share) / len(texts)) ** 0.5
    operands = Counter(len(re.findall(r"\d", tokenizer.decode(p).split("Compute")[-1])) for p, _ in examples)
    assert sorted(operands) == [3, 4, 5, 6] and min(operands.values()) == 1024  # difficulties 2-5, equal parts
    # The slip rate: wrong first equations of "steps" solutions (a step's own arithmetic, before any carry-on).
    firsts = [EQUATION.search(t).groups() for t in texts if strategy_of(t) == "steps"]
    wrong = sum(true_value(a, op, b) != int(v) for a, op, b, v in firsts) / len(firsts)
    assert abs(wrong - slip_rate) < 4 * (slip_rate * (1 - slip_rate) / len(firsts)) ** 0.5


def test_unknown_strategy_and_strategies_off_chain_are_refused():
    rng, sample = random.Random(0), make_task_dataset("chain", "train", 1, 2)[0]
    with pytest.raises(ValueError, match="unknown strategy 'guess'"):
        write(sample, "guess", rng, 0.0)
    with pytest.raises(ValueError, match="chain task"):
        demonstration(make_task_dataset("arithmetic", "train", 1, 1)[0], rng, strategy="steps")
    config = ModelConfig(base_strategies={"direct": 1.0, "guess": 1.0})
    with pytest.raises(ValueError, match=r"model.base_strategies.*unknown: \['guess'\]"):
        _examples(config, build_default_tokenizer(), DataConfig(task="chain", train_size=8), seed=0)
