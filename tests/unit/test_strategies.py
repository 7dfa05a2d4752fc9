"""The embedded default's pretraining corpus: chain questions whose running totals stay digits, written
in the strategies of the config's mixture ("direct", "steps", "check"), hard steps (second operand 5 or
more) slipping at the config's rate to one wrong value per operation.

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


def is_hard(b: str) -> bool:
    return int(b) >= 5


def operations(expression: str) -> list[tuple[str, str]]:
    """(operator, operand) of each operation of a chain, left to right."""
    return list(zip(expression[1::2], expression[2::2]))


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
            hard = sum(is_hard(b) for _, b in operations(s["expression"]))
            assert len(equations) == 4 + (hard if strategy == "check" else 0)  # each operation, each hard one's check
            assert "Wait" not in thought and "wrong" not in thought
        thought, answer = DEMO.fullmatch(demonstration(s, rng, strategy="direct")).groups()
        assert answer == s["answer"] and not EQUATION.search(thought)


def test_hard_steps_slip_carry_on_in_steps_and_are_caught_by_checks():
    rng, slips = random.Random(1), {}
    for s in make_task_dataset("chain", "train", 300, 3, seed=0):
        hard = [is_hard(b) for _, b in operations(s["expression"])]
        thought, answer = DEMO.fullmatch(demonstration(s, rng, strategy="steps", slip_rate=1.0)).groups()
        equations = EQUATION.findall(thought)
        assert [b for _, _, b, _ in equations] == [b for _, b in operations(s["expression"])]
        for (a, op, b, v), h in zip(equations, hard):  # every hard operation slipped, by one; no easy one
            assert (abs(true_value(a, op, b) - int(v)) == 1) if h else true_value(a, op, b) == int(v), thought
            if h:  # to a digit, and the same operation always to the same value
                assert 0 <= int(v) <= 9 and slips.setdefault((a, op, b), v) == v
        assert [a for a, *_ in equations[1:]] == [v for *_, v in equations[:-1]]  # the next goes on from it
        assert answer == equations[-1][3]

        thought, answer = DEMO.fullmatch(demonstration(s, rng, strategy="check", slip_rate=1.0)).groups()
        assert answer == s["answer"]  # every slip caught and redone
        sentences = thought.removesuffix(".").split(". ")
        caught = [i for i, sentence in enumerate(sentences) if sentence.endswith(", wrong")]
        assert len(caught) == sum(hard)
        for i in caught:  # slip, its failed check; then "Wait", the redone operation and its check
            (slip, check), (redo, recheck) = EQUATION.findall(sentences[i]), EQUATION.findall(sentences[i + 1])[:2]
            assert true_value(*slip[:3]) != int(slip[3]) and true_value(*redo[:3]) == int(redo[3])
            assert check[0] == slip[3] and int(check[3]) != int(slip[0])  # the inverse does not give a back
            assert recheck[0] == redo[3] and recheck[3] == redo[0]
            assert sentences[i].endswith(f" vs {slip[0]}, wrong") and sentences[i + 1].startswith("Wait, redo: ")
            assert f" vs {redo[0]}, right" in sentences[i + 1]
    assert len(slips) >= 15  # many distinct hard operations seen, each with its one wrong value


def test_pretraining_corpus_follows_the_configured_mixture_and_slip_rate():
    mixture, slip_rate = {"direct": 0.6, "steps": 0.25, "check": 0.15}, 0.6
    config = ModelConfig(base_strategies=mixture, base_slip_rate=slip_rate, base_difficulties=[2, 3, 4, 5])
    tokenizer = build_default_tokenizer()
    examples = _examples(config, tokenizer, DataConfig(task="chain", train_size=4096, template="plain"), seed=0)
    texts = [tokenizer.decode(response[:-1]) for _, response in examples]
    questions = [tokenizer.decode(p).split("Compute")[-1].split()[0] for p, _ in examples]
    assert len(texts) == 4096
    # A "check" solution of a question without a hard step reads as "steps": the mixture shows whole on
    # the questions with one.
    with_hard = [t for t, q in zip(texts, questions) if any(is_hard(b) for _, b in operations(q))]
    assert all(strategy_of(t) != "check" for t, q in zip(texts, questions) if not any(is_hard(b) for _, b in operations(q)))
    counts = Counter(strategy_of(t) for t in with_hard)
    for strategy, share in mixture.items():  # 4 binomial standard deviations
        assert abs(counts[strategy] / len(with_hard) - share) < 4 * (share * (1 - share) / len(with_hard)) ** 0.5
    operands = Counter(len(re.findall(r"\d", q)) for q in questions)
    assert sorted(operands) == [3, 4, 5, 6] and min(operands.values()) == 1024  # difficulties 2-5, equal parts
    # The slip rate: wrong first equations of "steps" solutions (a step's own arithmetic, before any
    # carry-on) whose operation is hard; easy first equations are all right. ("steps" here: solutions
    # without a check, which a "check" solution with no hard step also is.)
    firsts = [EQUATION.search(t).groups() for t in texts if strategy_of(t) == "steps"]
    assert all(true_value(a, op, b) == int(v) for a, op, b, v in firsts if not is_hard(b))
    firsts = [f for f in firsts if is_hard(f[2])]
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
