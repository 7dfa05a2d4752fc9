"""Rule rewards: maths accuracy (against math-verify's own verdicts), format, language consistency,
registry and composition."""

import pytest
from math_verify import parse, verify

from r1mega.rewards import RULE, all_scenario, compose, get_reward, registered_rewards
from r1mega.rewards.language import count_words
from r1mega.rewards.math_accuracy import extract_answer

math_accuracy = get_reward("math_accuracy")
format_r1_zero, format_r1 = get_reward("format_r1_zero"), get_reward("format_r1")
language = get_reward("language_consistency")


def r1_zero(answer: str) -> str:
    return f"<think> some reasoning </think><answer> {answer} </answer>"


@pytest.mark.parametrize("predicted, truth", [
    (r"\frac{1}{2}", "1/2"), ("0.5", "1/2"), ("1/2", "0.5"), (r"\dfrac12", "0.5"),
    (r"\{2,1\}", r"\{1,2\}"), ("{2,1}", r"\{1,2\}"), ("(0, 1]", "(0,1]"), ("-7", "-7"),
    ("12.0", "12"), (r"3\sqrt{2}", r"\sqrt{18}"),
])
def test_equivalent_answers_score_one(predicted, truth):
    # The reference: math-verify on the same pair written in explicit LaTeX delimiters.
    assert verify(parse(f"${truth}$"), parse(f"${predicted}$"))
    assert math_accuracy(r1_zero(predicted), {"answer": truth}).score == 1.0
    assert math_accuracy(rf"<think>x</think> So \boxed{{{predicted}}}.", {"answer": truth}).score == 1.0


@pytest.mark.parametrize("predicted, truth", [
    ("0.6", "1/2"), (r"\{1,3\}", r"\{1,2\}"), ("[0,1]", "(0,1]"), ("7", "-7"), ("x", "1"),
])
def test_wrong_answers_score_zero(predicted, truth):
    assert not verify(parse(f"${truth}$"), parse(f"${predicted}$"))
    out = math_accuracy(r1_zero(predicted), {"answer": truth})
    assert out.score == 0.0 and out.reason


@pytest.mark.parametrize("answer, truth, right", [
    ("The answer is 5", "5", True), ("so it is 7 apples", "7", True), ("It is 1/2", "0.5", True),
    ("I think 12", "12", True), ("5", "5", True), (r"\boxed{\frac{3}{4}}", "0.75", True),
    (r"\frac{1}{2}", "0.5", True), (r"It is $\sqrt{18}$", r"3\sqrt{2}", True),
    ("The answer is 6", "5", False), ("so it is 8 apples", "7", False), (r"\frac{1}{3}", "0.5", False),
])
def test_answer_text_graded_as_math_verify_grades_it(answer, truth, right):
    # The reference: math-verify's own parse of the answer text as the model wrote it (its default LaTeX
    # and expression extractions), against the ground truth in explicit LaTeX delimiters.
    assert verify(parse(f"${truth}$"), parse(answer)) == right
    assert math_accuracy(f"<think> x </think><answer>{answer}</answer>", {"answer": truth}).score == float(right)


def test_answer_extraction():
    assert extract_answer(r"<answer> The result is \boxed{\frac{3}{4}} </answer>") == r"\frac{3}{4}"
    assert extract_answer(r"\boxed{1} then \boxed{\{2, 3\}}") == r"\{2, 3\}"
    assert extract_answer("<answer>1</answer> and <answer>2</answer>") == "2"
    assert extract_answer("the answer is 5") is None
    out = math_accuracy("<think>x</think> the answer is 5", {"answer": "5"})
    assert out.score == 0.0 and "no <answer>" in out.reason


@pytest.mark.parametrize("completion, reason", [
    ("<think> a </think><answer> 3 </answer>", None),
    ("  <think>a</think>\n<answer>3</answer>\n<|endoftext|>", None),
    ("<think> a </think> 3", "expected exactly one <answer>, found 0"),
    ("<think> a <answer> 3 </answer>", "expected exactly one </think>, found 0"),
    ("<answer> 3 </answer><think> a </think>", "tags out of order"),
    ("Sure! <think> a </think><answer> 3 </answer>", "text before <think>"),
    ("<think> a </think> so <answer> 3 </answer>", "text between </think> and <answer>"),
    ("<think> a </think><answer> 3 </answer> done", "text after </answer>"),
    ("<think>a</think><think>b</think><answer>3</answer>", "expected exactly one <think>, found 2"),
    ("<think> a </think><answer> </answer>", "empty <answer>"),
])
def test_format_r1_zero(completion, reason):
    out = format_r1_zero(completion, {})
    assert out.score == (1.0 if reason is None else 0.0)
    if reason is not None:
        assert out.reason.startswith(reason)


@pytest.mark.parametrize("completion, ok", [
    ("<think> long thought </think>\n\nThe answer is 3.", True),
    ("<think> thought </think>   \n", False),
    ("Intro <think> thought </think> summary", False),
    ("</think> x <think> summary", False),
    ("thought without tags", False),
])
def test_format_r1(completion, ok):
    out = format_r1(completion, {})
    assert out.score == float(ok) and (ok or out.reason)


def test_word_counting_rules():
    # Lone letters, LaTeX commands, digits and punctuation are not words; each ideograph is one word.
    assert count_words(r"Let x = \frac{1}{2}; so 2y = 1.") == {"cjk": 0, "latin": 2, "other": 0}
    assert count_words("我们计算 x+1") == {"cjk": 4, "latin": 0, "other": 0}
    assert count_words("Привет, café") == {"cjk": 0, "latin": 1, "other": 1}


@pytest.mark.parametrize("thought, lang, share", [
    ("First we add the numbers, then check.", "en", 1.0),
    ("我们先把数字相加", "zh", 1.0),
    ("我们先把数字相加", "en", 0.0),
    ("We add 数字 then check", "en", 4 / 6),   # We add then check | 数 字
    ("We add 数字 then check", "zh", 2 / 6),
    ("3 + 4 = 7", "en", 1.0),                     # no words at all
])
def test_language_share(thought, lang, share):
    out = language(f"<think>{thought}</think> summary", {"language": lang})
    assert out.score == pytest.approx(share)


def test_language_needs_a_think_block():
    assert language("no think block at all", {"language": "en"}).score == 0.0


@pytest.mark.parametrize("thought", ["", "  \n "])
def test_empty_chain_of_thought_scores_zero(thought):
    # The paper's score is the share of target-language words in the CoT: an empty one holds none.
    out = language(f"<think>{thought}</think> The answer is 3.", {"language": "en"})
    assert out.score == 0.0 and out.reason == "empty chain of thought"
    with pytest.raises(ValueError, match="unsupported"):
        language("<think>x</think>", {"language": "xx"})


def test_registry_and_compositions():
    assert {"math_accuracy", "format_r1_zero", "format_r1", "language_consistency", "code_accuracy",
            "code_pass_rate"} <= set(registered_rewards())
    specs = compose(RULE)
    assert [(s.name, s.weight) for s in specs] == [("math_accuracy", 1.0), ("format_r1_zero", 1.0)]
    assert all_scenario() == {"math_accuracy": 1.0, "helpful_rm": 1.0, "format_r1": 1.0, "language_consistency": 1.0}
    with pytest.raises(KeyError, match="unknown reward 'nope'"):
        compose({"nope": 1.0})
    with pytest.raises(ValueError, match="more than once"):
        compose([("format_r1", 1.0), ("format_r1", 2.0)])


def test_countdown_accuracy_evaluates_the_expression():
    from r1mega.data.tasks import make_task_dataset

    countdown = get_reward("countdown_accuracy")
    for row in make_task_dataset("countdown", "test", size=5, difficulty=2):
        assert countdown(r1_zero(row["answer"]), row).score == 1.0  # the generator's own solution
        assert countdown(r1_zero(f"{row['answer']} = {row['target']}"), row).score == 1.0
    sample = {"numbers": [2, 3, 4], "target": 14}
    assert countdown(r1_zero("4 * 3 + 2"), sample).score == 1.0      # another solution than the stored one
    assert countdown(r1_zero("2 + 3 * 4"), sample).score == 1.0
    for wrong, why in [("4 * 3 + 3", "does not use"), ("4 * 3", "does not use"), ("(2 + 3) * 4", "not 14"),
                       ("4 / (3 - 3) + 2", "not a valid"), ("import os", "not a valid")]:
        out = countdown(r1_zero(wrong), sample)
        assert out.score == 0.0 and why in out.reason
