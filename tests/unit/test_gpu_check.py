"""The GPU verification kit (benchmarks/gpu_check.py) works before any GPU does: its dry run, in a
subprocess, writes every part's JSON with the numbers each part is for, CUDA-only parts skipped with a
reason; the pieces it rests on (the time box, the JUnit and wheel checks, the FLOP count behind the
MFU) each against an independent reference."""

import json
import os
import pathlib
import subprocess
import sys
import time

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402
import gpu_wheels  # noqa: E402
import model_flops  # noqa: E402
import timebox  # noqa: E402

from r1mega.models import Transformer  # noqa: E402
from r1mega.models.config import ModelConfig, tiny_deepseek_v3  # noqa: E402

PARTS = ["setup", "a", "b", "c", "d", "e"]
EXPECTED = {"setup": "ok", "a": "skipped", "b": "ok", "c": "ok", "d": "ok", "e": "skipped"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("OUT", None)
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    return done, out


def _part(out, key):
    return json.loads((out / f"part_{key}.json").read_text())


def test_dry_run_writes_every_part_with_its_status(dry_run):
    done, out = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    # what the device tool brings back: at most 8 files
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["summary.json", "gpu_check.log"] + [f"part_{k}.json" for k in PARTS])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["ok"] and summary["dry_run"]
    for key in PARTS:
        part = _part(out, key)
        assert part["part"] == key and part["status"] == EXPECTED[key], (key, part)
        assert summary["parts"][key]["status"] == part["status"]
        assert part["seconds"] >= 0
        if part["status"] == "skipped":
            assert part["reason"]
        for command in part.get("commands", []):
            assert command["rc"] == 0 and not command["timed_out"], (key, command)


def test_dry_run_setup_probes_the_kernels(dry_run):
    setup = _part(dry_run[1], "setup")["results"]
    assert "skipped in the dry run" in setup["build"]
    kernels = setup["probe"]["kernels"]
    assert set(kernels) == {"grpo_loss", "group_advantages", "linear_logprob", "linear_grpo_loss", "moe_route",
                            "moe_permute", "moe_unpermute"}
    assert all(on["cpu"] for on in kernels.values())
    if gpu_wheels.wheels():  # fetched: they must install for Python 3.12
        assert {w.name for w in gpu_wheels.wheels()} == set(setup["wheels"]["installed"])


def test_dry_run_gpu_tests_skip_themselves_without_cuda(dry_run):
    a = _part(dry_run[1], "a")
    assert "CUDA" in a["reason"]
    counts = a["results"]
    assert counts["skipped"] > 0 and counts["passed"] == counts["failed"] == counts["errors"] == 0


def test_dry_run_ops_rows_carry_bandwidth_and_matmul_ceilings(dry_run):
    rows = _part(dry_run[1], "b")["results"]["rows"]
    assert {r["op"] for r in rows} >= {"grpo_loss", "group_advantages", "linear_logprob_fwd_bwd",
                                       "linear_grpo_loss_fwd_bwd", "moe_route+permute", "moe_route", "moe_permute",
                                       "moe_unpermute"}
    assert not [r for r in rows if "error" in r]
    for row in rows:
        assert row["kernel_s"] > 0 and row["baselines"]
        if row["op"].startswith("grpo_loss"):
            assert row["copy_gb_per_s"] > 0 and row["kernel_gb_per_s"] > 0
        if row["op"].startswith("linear_"):
            n, h, v = 256, 64, 1024  # the toy shape: 4 GEMMs of 2 N H V a call
            assert row["flops"] == 4 * 2 * n * h * v
            assert row["matmul_tflops"] > 0
            assert row["kernel_tflops"] == pytest.approx(row["flops"] / row["kernel_s"] / 1e12)


def test_dry_run_engine_and_grpo_step_report_their_rates(dry_run):
    out = dry_run[1]
    c = _part(out, "c")["results"]["throughput"]
    assert c["native_tokens_per_s"] > 0 and c["transformers_tokens_per_s"] > 0
    assert c["speedup"] == pytest.approx(c["native_tokens_per_s"] / c["transformers_tokens_per_s"])
    d = _part(out, "d")["results"]
    assert d["tokens_per_step"] == 2 * 2 * (16 + 48)  # questions x group x (prompt + response)
    assert d["tokens_per_s"] == pytest.approx(d["tokens_per_step"] / d["step_s"])
    assert d["mfu"] is None and d["peak_tflops"] is None  # no datasheet peak for a CPU
    assert d["mfu_vs_matmul"] == pytest.approx(d["flops_per_step"] / d["step_s"] / 1e12 / d["matmul_tflops"])
    assert "CUDA" in _part(out, "e")["reason"]


def test_timebox_kills_the_whole_process_group(tmp_path):
    pid_file = tmp_path / "child.pid"
    start = time.monotonic()
    with open(tmp_path / "log", "w") as log:
        done = timebox.run(["bash", "-c", f"sleep 60 & echo $! > {pid_file}; echo started; wait"], 2, cwd=tmp_path,
                           env=dict(os.environ), log=log)
    assert done.timed_out and done.rc is None and "started" in done.tail
    assert time.monotonic() - start < 30
    child = int(pid_file.read_text())
    assert _dead_within(child, 10)  # the background grandchild died with its group


def _dead_within(pid: int, seconds: float) -> bool:
    """Whether `pid` is gone or a zombie (killed, not yet reaped by whoever inherited it) within `seconds`."""
    stat = pathlib.Path(f"/proc/{pid}/stat")
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            if stat.read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):  # the state follows the name
                return True
        except (FileNotFoundError, ProcessLookupError):
            return True
        time.sleep(0.05)
    return False


def test_junit_counts_outcomes_and_skip_reasons(tmp_path):
    report = tmp_path / "r.xml"
    report.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="t" name="ok1"/><testcase classname="t" name="ok2"/>'
        '<testcase classname="t" name="bad"><failure message="assert 1 == 2"/></testcase>'
        '<testcase classname="t" name="broken"><error message="fixture"/></testcase>'
        '<testcase classname="t" name="s1"><skipped message="needs a CUDA device"/></testcase>'
        '<testcase classname="t" name="s2"><skipped message="needs a CUDA device"/></testcase>'
        '<testcase classname="t" name="s3"><skipped message="no sglang"/></testcase>'
        '</testsuite></testsuites>')
    counts = gpu_check.junit_counts(report)
    assert {k: counts[k] for k in ("passed", "failed", "errors", "skipped")} == dict(passed=2, failed=1, errors=1,
                                                                                      skipped=3)
    assert counts["skip_reasons"] == {"needs a CUDA device": 2, "no sglang": 1}
    assert counts["failures"] == ["t::bad: assert 1 == 2", "t::broken: fixture"]


def test_wheel_problems_catch_what_stops_the_install(tmp_path):
    names = ["a_pkg-1.0-py3-none-any.whl", "a_pkg-1.1-py3-none-any.whl", "b-2.0-cp311-cp311-manylinux_2_17_x86_64.whl",
             "c-3.0-cp312-cp312-manylinux_2_28_x86_64.whl"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    issues = gpu_wheels.problems(sorted(tmp_path.iterdir()))
    assert any("several versions of a-pkg" in i for i in issues)
    assert any(i.startswith("b-2.0-cp311") for i in issues)
    assert not any(i.startswith("c-3.0") for i in issues) and len(issues) == 2


@pytest.mark.parametrize("cfg", [
    tiny_deepseek_v3(),
    tiny_deepseek_v3(q_lora_rank=None, first_k_dense_replace=2, n_shared_experts=0),
    ModelConfig(architecture="Qwen2ForCausalLM", vocab_size=300, hidden_size=64, intermediate_size=96,
                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, attention_bias=True),
], ids=["mla_moe", "mla_no_q_lora", "gqa_dense"])
def test_forward_flops_match_torch_flop_counter(cfg):
    """The matrix products of a forward, as torch's FlopCounterMode counts them (the CPU's attention
    kernel is not counted by it, so the attention pairs are checked on their own below)."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    tokens = 37
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randint(0, cfg.vocab_size, (1, tokens)))
    counted = sum(n for op, n in counter.get_flop_counts()["Global"].items() if str(op) in ("aten.mm", "aten.addmm"))
    assert counted == model_flops.forward_flops(cfg, trunk_tokens=tokens, head_tokens=tokens, attention_pairs=0)


def test_shared_prefix_pairs_count_the_attention_mask():
    """Pairs a group's attention computes, counted on an explicit [T, T] visibility mask: the prompt
    causal on itself, each response over the prompt and its own earlier tokens."""
    prompt, responses = 5, [3, 1, 4]
    total = prompt + sum(responses)
    owner = torch.tensor([-1] * prompt + [i for i, r in enumerate(responses) for _ in range(r)])  # -1: the prompt
    causal = torch.ones(total, total).tril().bool()
    key_is_prompt = (owner == -1)[None, :]
    same_sequence = owner[:, None] == owner[None, :]
    visible = causal & (key_is_prompt | same_sequence)
    assert model_flops.shared_prefix_pairs(prompt, responses) == int(visible.sum())
    assert model_flops.causal_pairs(7) == int(torch.ones(7, 7).tril().sum())
