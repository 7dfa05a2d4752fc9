"""Each rejection-sampling filter on texts that must pass and texts that must fail, the per-prompt
selection (duplicates, limit, first failing reason) and the reasoning/non-reasoning mix."""

from collections import Counter

import pytest

from r1mega.pipeline.rejection import (
    RejectionSettings, asks_for_code, long_paragraph, mix, mixed_language, select, unrequested_code, verdict,
)

ROW = {"question": "Compute 2 + 3", "answer": "5"}
GOOD = "<think> 2 + 3 = 5. Let me verify: the check is correct. </think><answer> 5 </answer>"
OK = {"math_accuracy": 1.0, "format_r1_zero": 1.0}


def test_mixed_language():
    assert mixed_language(GOOD, ROW, 0.95) is None
    mixed = "<think> 2 + 3 等于 5 所以 答案 是 五 check </think><answer> 5 </answer>"
    assert mixed_language(mixed, ROW, 0.95) == "mixed_language"
    assert mixed_language(mixed, ROW, 0.0) is None  # threshold 0 keeps everything
    assert mixed_language(mixed, {**ROW, "language": "zh"}, 0.5) is None  # mostly Chinese: fine for zh


def test_long_paragraph():
    short = "word " * 50
    assert long_paragraph(f"{short}\n\n{short}", max_chars=300) is None
    assert long_paragraph(short * 3, max_chars=300) == "long_paragraph"
    assert long_paragraph(f"{short}\n   \n{short}", max_chars=300) is None  # a blank line with spaces splits


def test_unrequested_code():
    code = GOOD.replace("</think>", "```python\nprint(5)\n``` </think>")
    assert unrequested_code(GOOD, ROW) is None
    assert unrequested_code(code, ROW) == "unrequested_code"
    assert unrequested_code(code, {"question": "Write a Python function that adds two numbers"}) is None
    assert unrequested_code(code, {"question": "Add them", "tests": []}) is None
    assert not asks_for_code({"question": "Compute the encoded value"})  # "code" only as a whole word


def test_verdict_order():
    settings = RejectionSettings()
    assert verdict(GOOD, ROW, OK, settings) is None
    assert verdict(" \n", ROW, OK, settings) == "empty"
    assert verdict(GOOD, ROW, {**OK, "math_accuracy": 0.0}, settings) == "incorrect"
    assert verdict(GOOD, ROW, {**OK, "format_r1_zero": 0.0}, settings) == "format"
    # a language-consistency reward component does not count as a format or accuracy test
    assert verdict(GOOD, ROW, {**OK, "language_consistency": 0.5}, settings) is None


def test_select_drops_duplicates_and_caps_per_prompt():
    settings = RejectionSettings(max_per_prompt=2)
    other = GOOD.replace("Let me verify: the check is correct.", "")
    third = GOOD.replace("2 + 3 = 5.", "3 + 2 = 5.")
    candidates = [(GOOD, {**OK, "math_accuracy": 0.0}), (GOOD, OK), (" " + GOOD.replace(" ", "  ") + "\n", OK),
                  (other, OK), (third, OK)]
    kept, reasons = select(candidates, ROW, settings)
    assert kept == [1, 3]
    assert reasons == Counter({"incorrect": 1, "duplicate": 1, "per_prompt_limit": 1})


def test_mix_share_and_provenance():
    reasoning = [{"prompt": f"q{i}", "response": "r", "kind": "reasoning"} for i in range(30)]
    general = [{"prompt": f"g{i}", "response": "s"} for i in range(4)]
    rows = mix(reasoning, general, 0.25, seed=0)
    kinds = Counter(r["kind"] for r in rows)
    assert kinds == {"reasoning": 30, "non_reasoning": 10}  # 10 / 40 = 0.25, drawn with repeats
    assert {r["prompt"] for r in rows if r["kind"] == "non_reasoning"} == {f"g{i}" for i in range(4)}
    assert len(mix(reasoning, general, 0.0, seed=0)) == 30
    with pytest.raises(ValueError):
        mix(reasoning, general, 1.0, seed=0)
