"""The GRPO trainer end to end on a tiny random model: on-policy first step, learning on an easy
reward, exact resume after SIGKILL, and the Hydra CLI's strictness."""

import copy
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from r1mega.cli.train import CONF_DIR
from r1mega.config import register_configs
import reward_helpers  # noqa: F401  (registers test_digit_share)
from r1mega.ops.group_advantages import group_advantages
from r1mega.trainers.grpo import GRPOTrainer
from r1mega.trainers.policy_update import sequence_logprobs, update_policy
from r1mega.trainers.rollout_batch import RolloutBatch

# One rollout of 2 questions x 4 samples, one optimizer step on all of them (on-policy).
FAST = ["model.init=random", "algo.train_batch_size=2", "algo.ppo_mini_batch_size=2", "algo.group_size=4",
        "rollout.max_new_tokens=[[0,6]]",
        "data.train_size=64", "data.test_size=4", "train.progress=false", "train.tensorboard=false"]


def make_config(tmp_path, *overrides):
    register_configs()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose("config", overrides=[*FAST, f"train.out_dir={tmp_path}", *overrides])
    return OmegaConf.to_object(cfg)


def test_first_step_is_on_policy(tmp_path):
    # Reference = policy and one mini-batch: every ratio is 1, nothing is clipped, the KL is 0.
    trainer = GRPOTrainer(make_config(tmp_path, "algo.beta=0.1"))
    metrics = trainer.train_step()
    assert metrics["train/ratio_mean"] == pytest.approx(1.0, abs=1e-5)
    assert metrics["train/ratio_min"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["train/ratio_max"] == pytest.approx(1.0, abs=1e-4)
    assert metrics["train/clip_fraction"] == 0.0
    assert metrics["train/kl"] == pytest.approx(0.0, abs=1e-6)
    # The engine sampled with the trainer's weights: its logprobs agree with the trainer's.
    assert metrics["rollout/logprob_mismatch"] < 1e-4
    trainer.scorer.close()


def test_on_policy_update_equals_the_update_with_recomputed_old_logprobs(tmp_path):
    # One mini-batch and epoch: the loss pass's own logprobs stand in for the old ones (no extra
    # forward). The step must equal the one fed old logprobs from a separate no-grad forward.
    cfg = make_config(tmp_path, "algo.beta=0.0", "algo.token_budget=40", "algo.lr=1e-2")
    trainer = GRPOTrainer(cfg)
    trainer.scorer.close()
    gen = torch.Generator().manual_seed(0)
    vocab = trainer.policy.config.vocab_size
    lengths = [5, 9, 3, 7, 9, 2, 6, 8]
    prompts = [torch.randint(0, vocab, (4,), generator=gen).tolist() for _ in lengths]
    response_ids, mask = RolloutBatch.pad([torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths])
    rewards = torch.rand(len(lengths), generator=gen)
    updated = []
    for recompute in (False, True):
        policy = copy.deepcopy(trainer.policy)
        # SGD: weights then differ by lr times the gradients' fp32 noise. Adam's first step, g / (|g| + eps),
        # turns the noise of a near-zero gradient element into a step of up to lr (seen on an AVX-512 CPU).
        optimizer = torch.optim.SGD(policy.parameters(), lr=cfg.algo.lr)
        batch = RolloutBatch(prompts, response_ids, mask, torch.zeros_like(mask, dtype=torch.float32), rewards,
                             advantages=group_advantages(rewards, group_size=4))
        if recompute:
            batch.old_logp = sequence_logprobs(policy, batch, temperature=1.0, token_budget=40, device="cpu")
        update = update_policy(policy, optimizer, batch, cfg.algo, max_new_tokens=9, temperature=1.0, device="cpu",
                               generator=random.Random(0))
        updated.append((policy.state_dict(), batch.old_logp if recompute else update.logp, update.stats))
    (on_policy, on_logp, on_stats), (recomputed, re_logp, re_stats) = updated
    torch.testing.assert_close(on_logp, re_logp, atol=1e-5, rtol=0)  # returned for the mismatch metric
    assert on_stats["train/clip_fraction"] == 0 and on_stats["train/ratio_max"] == 1.0
    torch.testing.assert_close(on_stats["train/loss"], re_stats["train/loss"], atol=1e-6, rtol=1e-5)
    for name, tensor in on_policy.items():
        torch.testing.assert_close(tensor, recomputed[name], atol=1e-6, rtol=1e-5, msg=name)


def test_reward_rises_on_easy_task(tmp_path):
    cfg = make_config(tmp_path, "algo.lr=2e-2", "algo.beta=0.0", "algo.group_size=8", "rollout.max_new_tokens=[[0,8]]")
    cfg.reward.components = {"test_digit_share": 1.0}
    trainer = GRPOTrainer(cfg)
    rewards = [trainer.train_step()["reward/mean"] for _ in range(14)]
    early, late = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert late > early + 0.1, rewards
    trainer.scorer.close()


def _run_cli(out_dir: Path, *extra: str, kill_after_rows: int | None = None) -> int:
    # 6 rollouts of 2 steps (one question's samples each); a checkpoint every 2 rollouts
    cmd = [sys.executable, "-m", "r1mega.cli.train", *FAST, f"train.out_dir={out_dir}", "train.steps=12",
           "train.save_every=4", "train.eval_every=6", "algo.ppo_mini_batch_size=1", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    if kill_after_rows is None:
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out.decode()[-3000:]
        return proc.returncode
    metrics = out_dir / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after_rows:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    return proc.returncode


def _rows(path: Path) -> list[dict]:
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    # Wall-clock numbers differ between any two runs; everything else must match exactly.
    return [{k: v for k, v in row.items() if not k.startswith(("time/", "throughput/", "reward/score_time"))}
            for row in rows]


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    _run_cli(tmp_path / "straight")
    killed = _run_cli(tmp_path / "killed", kill_after_rows=4)
    assert killed == -signal.SIGKILL
    assert (tmp_path / "killed" / "checkpoints" / "latest").exists()
    _run_cli(tmp_path / "killed", "train.resume=true")
    straight, resumed = _rows(tmp_path / "straight"), _rows(tmp_path / "killed")
    assert [r["step"] for r in resumed] == list(range(2, 13, 2))  # one row a rollout, keyed by the steps done
    assert resumed == straight


def test_cli_rejects_unknown_and_ill_typed_keys(tmp_path):
    for override, name in (("algo.not_a_key=1", "not_a_key"), ("algo.lr=fast", "algo.lr")):
        result = subprocess.run([sys.executable, "-m", "r1mega.cli.train", override, f"train.out_dir={tmp_path}"],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode != 0
        assert name in result.stderr + result.stdout
        assert not (tmp_path / "metrics.jsonl").exists()


@pytest.mark.parametrize("override,message", [("parallel.tp=2", "parallel.tp=2 needs as many processes"),
                                              ("parallel.ep=2", "parallel.ep=2 needs as many processes"),
                                              ("parallel.pp=2", "parallel.pp=2 needs as many processes")])
def test_parallel_settings_one_process_cannot_honour_are_refused(tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        GRPOTrainer(make_config(tmp_path, override))
