"""Code accuracy: run the completion's final Python code block against the sample's tests in the sandbox.

`sample["tests"]` (a list, or its JSON text) holds test cases of two kinds:
- stdin/stdout: `{"input": str, "output": str}`: the program runs once per case with `input` on stdin;
  it passes when its stdout equals `output` up to trailing whitespace on each line and trailing blank
  lines, and it exits with status 0.
- function call: `{"call": "f(1, 2)", "expected": value-or-repr}`: all calls run in one sandboxed
  program that first executes the code (as module `__solution__`, so a `__main__` block does not run)
  and then evaluates each call. The result's repr is compared on the host: both sides are read back
  with `ast.literal_eval` where possible (so `expected` may be a value or its repr; write `"'1'"` for the
  string "1"), numbers compare with a relative tolerance of 1e-6, lists and tuples alike.

`code_accuracy` gives 1 when every test passes (stopping at the first failure), `code_pass_rate` the
share that pass; `sample["code_reward"] = "pass_rate"` or `"all"` overrides the registered choice per
row. `sample["time_limit_s"]` sets the per-run wall-clock limit (CPU limit follows it).

The function-call driver runs in the same interpreter as the solution and writes one JSON line per call
to the sandbox's results pipe (fd 3), which the host reads apart from stdout: nothing the solution
prints can count as a result, and there is no secret for it to find. A solution can write to that pipe
too, but a line it writes there only claims a value it could as well have returned. Deliberately left
out: languages other than Python, special judges (floating-point output tolerance, several valid
outputs), and per-test memory limits.
"""

from __future__ import annotations

import ast
import json
import math
import re
from dataclasses import replace
from typing import Any, Mapping, Sequence

from r1mega.rewards.registry import RewardOutput, register_reward
from r1mega.rewards.sandbox import Limits, SandboxResult, run_python

_FENCE = re.compile(r"```[ \t]*(python3?|py)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_DRIVER = """import json as _json, os as _os, sys as _sys
_calls = _json.loads(_sys.stdin.read())
_results = _os.fdopen(3, "w")
_ns = {{"__name__": "__solution__"}}
exec(compile({solution!r}, "solution.py", "exec"), _ns)
for _call in _calls:
    try:
        _out = {{"ok": True, "repr": repr(eval(_call, _ns))}}
    except BaseException as _e:
        _out = {{"ok": False, "error": type(_e).__name__}}
    _results.write(_json.dumps(_out) + "\\n")
    _results.flush()
"""


def extract_code(completion: str) -> str | None:
    """The content of the completion's last fenced code block tagged python/py or untagged."""
    blocks = [m.group(2) for m in _FENCE.finditer(completion)]
    return blocks[-1] if blocks else None


def _normalise_output(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines()).rstrip()


def _literal(text: Any) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def values_equal(actual: Any, expected: Any) -> bool:
    if isinstance(actual, bool) or isinstance(expected, bool):
        return actual is expected
    if isinstance(actual, (int, float)) and isinstance(expected, (int, float)):
        return math.isclose(actual, expected, rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(actual, (list, tuple)) and isinstance(expected, (list, tuple)):
        return len(actual) == len(expected) and all(values_equal(a, e) for a, e in zip(actual, expected))
    if isinstance(actual, dict) and isinstance(expected, dict):
        return actual.keys() == expected.keys() and all(values_equal(actual[k], expected[k]) for k in actual)
    return actual == expected


def _failure(result: SandboxResult) -> str:
    if result.timed_out:
        return "time limit exceeded"
    if result.output_exceeded:
        return "output limit exceeded"
    return f"exit status {result.returncode}: {result.stderr.strip().splitlines()[-1][:80] if result.stderr.strip() else ''}"


def _run_io_tests(code: str, tests: Sequence[Mapping[str, Any]], limits: Limits, stop_early: bool) -> tuple[int, str | None]:
    passed, reason = 0, None
    for i, test in enumerate(tests):
        result = run_python(code, str(test["input"]), limits)
        if not result.ok:
            reason = reason or f"test {i}: {_failure(result)}"
        elif _normalise_output(result.stdout) != _normalise_output(str(test["output"])):
            reason = reason or f"test {i}: wrong output {result.stdout.strip()[:40]!r}"
        else:
            passed += 1
            continue
        if stop_early:
            break
    return passed, reason


def _outcome(line: str) -> dict[str, Any]:
    """One line of the results pipe; anything but the driver's two shapes is a failed call."""
    try:
        out = json.loads(line)
    except ValueError:
        out = None
    if isinstance(out, dict) and ((out.get("ok") is True and isinstance(out.get("repr"), str))
                                  or (out.get("ok") is False and isinstance(out.get("error"), str))):
        return out
    return {"ok": False, "error": "a malformed result"}


def _run_call_tests(code: str, tests: Sequence[Mapping[str, Any]], limits: Limits) -> tuple[int, str | None]:
    result = run_python(_DRIVER.format(solution=code), json.dumps([str(t["call"]) for t in tests]), limits)
    outcomes = [_outcome(line) for line in result.results.splitlines()]
    passed, reason = 0, None
    for i, test in enumerate(tests):
        if i >= len(outcomes):
            reason = reason or f"call {i}: no result ({_failure(result)})"
        elif not outcomes[i]["ok"]:
            reason = reason or f"call {i}: raised {outcomes[i]['error']}"
        elif not values_equal(_literal(outcomes[i]["repr"]), _literal(test["expected"])):
            reason = reason or f"call {i}: got {outcomes[i]['repr'][:40]}"
        else:
            passed += 1
    return passed, reason


def score_code(completion: str, sample: Mapping[str, Any], mode: str) -> RewardOutput:
    code = extract_code(completion)
    if code is None:
        return RewardOutput(0.0, "no ```python code block in the completion")
    tests = sample.get("tests")
    tests = json.loads(tests) if isinstance(tests, str) else tests
    if not tests:
        return RewardOutput(0.0, "sample has no 'tests'")
    mode = sample.get("code_reward", mode)
    limits = Limits()
    if sample.get("time_limit_s"):
        wall = float(sample["time_limit_s"])
        limits = replace(limits, wall_s=wall, cpu_s=max(1, math.ceil(wall)))
    calls = [t for t in tests if "call" in t]
    io = [t for t in tests if "call" not in t]
    passed, reasons = 0, []
    if io:
        n, reason = _run_io_tests(code, io, limits, stop_early=mode == "all")
        passed, reasons = passed + n, reasons + [reason]
    if calls and (mode != "all" or passed == len(io)):
        n, reason = _run_call_tests(code, calls, limits)
        passed, reasons = passed + n, reasons + [reason]
    reason = next((r for r in reasons if r), None)
    if mode == "all":
        return RewardOutput(float(passed == len(tests)), reason)
    return RewardOutput(passed / len(tests), reason)


@register_reward("code_accuracy", runs_code=True)
def code_accuracy(completion: str, sample: Mapping[str, Any]) -> RewardOutput:
    return score_code(completion, sample, "all")


@register_reward("code_pass_rate", runs_code=True)
def code_pass_rate(completion: str, sample: Mapping[str, Any]) -> RewardOutput:
    return score_code(completion, sample, "pass_rate")
