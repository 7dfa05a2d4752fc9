"""One-step-off (s-step-off) rollouts: the queue hands out batches in order, generating the next on a
background thread and gathering on the main one; the trainer with rollout.staleness=1 gives exactly the
metrics of a synchronous run whose engine receives every weight update one rollout late (the definition
of training on samples one step stale, built here around the synchronous trainer), and a run resumed
from a checkpoint trains on the batches it had generated ahead."""

import threading

import pytest
import torch

from r1mega.trainers.grpo import GRPOTrainer
from r1mega.trainers.rollout_queue import RolloutQueue
from grpo_runs import grpo_config

SKIP = ("time/", "throughput/", "reward/score_time_s")


def test_queue_generates_ahead_in_order_on_a_background_thread():
    log = []

    def prepare(index):
        log.append(("prepare", index, threading.current_thread() is threading.main_thread()))
        return lambda: (index, threading.current_thread() is threading.main_thread())

    def finish(result):
        log.append(("finish", result[0], threading.current_thread() is threading.main_thread()))
        return result[0]

    queue = RolloutQueue(2, prepare, finish)
    taken = []
    for index in range(3):
        taken.append(queue.take(index))
        queue.wait()
    assert taken == [0, 1, 2] and queue.next_index == 5 and list(queue.ready) == [3, 4]
    assert all(on_main for _, _, on_main in log)  # prepare and finish: the main thread
    # batches 0 and 1 generated at the start (the first weights), then one a rollout in the background
    assert [entry[:2] for entry in log[:4]] == [("prepare", 0), ("finish", 0), ("prepare", 1), ("finish", 1)]


def test_queue_raises_the_background_error_on_the_main_thread():
    def prepare(index):
        def job():
            if index == 1:
                raise RuntimeError("engine died")
            return index
        return job

    queue = RolloutQueue(1, prepare, lambda result: result)
    assert queue.take(0) == 0
    with pytest.raises(RuntimeError, match="engine died"):
        queue.wait()


def _rows(steps):
    return [{k: v for k, v in row.items() if not k.startswith(SKIP)} for row in steps]


def test_one_step_off_equals_synchronous_training_on_one_step_stale_samples(tmp_path):
    rollouts = 4
    trainer = GRPOTrainer(grpo_config(tmp_path / "async", "rollout.staleness=1"))
    try:
        one_step_off = _rows(trainer.train_step() for _ in range(rollouts))
    finally:
        trainer.scorer.close()

    trainer = GRPOTrainer(grpo_config(tmp_path / "sync"))
    apply, late = trainer.engine.update_weights, []

    def one_update_late(named_tensors, version):
        late.append([(name, tensor.detach().clone()) for name, tensor in named_tensors])
        if len(late) > 1:
            apply(late[-2], version)

    trainer.engine.update_weights = one_update_late
    try:
        stale = _rows(trainer.train_step() for _ in range(rollouts))
    finally:
        trainer.scorer.close()
    assert one_step_off == stale
    # The engine's logprobs are the previous weights' from the second rollout on: the mismatch shows it.
    assert one_step_off[0]["rollout/logprob_mismatch"] < 1e-5 < one_step_off[2]["rollout/logprob_mismatch"]


def test_resume_trains_on_the_batches_generated_ahead(tmp_path):
    def run(out, steps, resume=False):
        trainer = GRPOTrainer(grpo_config(out, "rollout.staleness=1", f"train.resume={str(resume).lower()}"))
        try:
            rows = _rows(trainer.train_step() for _ in range(steps))
            trainer.save()
            return rows
        finally:
            trainer.scorer.close()

    whole = run(tmp_path / "whole", 4)
    first = run(tmp_path / "cut", 2)
    second = run(tmp_path / "cut", 2, resume=True)
    assert first + second == whole
