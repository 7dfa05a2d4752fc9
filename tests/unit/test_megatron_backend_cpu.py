"""megatron-core on the CPU (tests/megatron_cpu_parity.py, in a subprocess: it shims megatron's CUDA
allocations, which the package never does) against the native model on the same weights: logits for
every architecture; the trainer's path through `MegatronPolicy`, routing replay included; and GRPO
steps of the trainer with `model.backend=megatron` against `model.backend=native`."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core", reason="megatron-core is not installed (pip install r1mega[megatron])")

from grpo_runs import assert_same_steps  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_parity(*names: str) -> list[dict]:
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "megatron_cpu_parity.py"), str(_free_port()), *names],
                         capture_output=True, text=True, timeout=900, cwd=ROOT,
                         env={"PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert len(rows) == len(names), out.stderr[-3000:]
    return rows


@pytest.mark.slow
def test_megatron_core_on_cpu_matches_native_logits():
    sys.path.insert(0, str(ROOT / "tests"))
    from megatron_cpu_parity import CONFIGS

    for row in run_parity(*CONFIGS):
        assert row["same_names"], row
        assert row["logits_diff"] <= 1e-5 * max(1.0, row["scale"]), row
        assert row["hidden_diff"] <= 1e-4, row


def test_megatron_policy_trains_like_the_native_model():
    # Packed micro-batches, the fused on-policy GRPO loss, an SGD step, the expert-bias update from
    # megatron's router counts, and the weights exported for the engine.
    rows = run_parity("policy:deepseek_v3", "policy:qwen2_tied")
    for row in rows:
        assert row["same_keys"], row
        assert row["hidden_diff"] <= 1e-5 and row["loss_diff"] <= 1e-6 and row["grad_norm_rel_diff"] <= 1e-5, row
        # an SGD step of lr 0.1 on equal gradients, and an expert-bias step of 0.01 on equal loads
        assert row["weights_diff"] <= 1e-6, row
    assert rows[0]["bias_moved"]  # the MoE model's expert bias was updated


def test_megatron_policy_replays_routing_like_the_native_model():
    # One random routing record replayed by both (R3) on a micro-batch whose samples share prompts:
    # DeepSeek-V3's sigmoid router with group-limited top-k, Qwen3-MoE's softmax one.
    for row in run_parity("replay:deepseek_v3", "replay:qwen3_moe"):
        assert row["hidden_diff"] <= 1e-5 and row["loss_diff"] <= 1e-6 and row["grad_norm_rel_diff"] <= 1e-5, row
        assert row["replay_moved"] > 1e-3, row  # the record, not megatron's own top-k, routed


def test_trainer_with_megatron_backend_matches_native_steps():
    # Three GRPO steps (AdamW, reference KL, engine weight sync from megatron's exported weights).
    (row,) = run_parity("trainer:tiny_deepseek_v3")
    assert row["policy_type"] == "MegatronPolicy"
    assert_same_steps(row["native"], row["megatron"], rel=1e-3)
