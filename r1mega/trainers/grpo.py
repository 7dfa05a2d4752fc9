"""GRPO, as DeepSeek-R1 trains with it: the driver of a run.

Each step: Q questions x G samples from the engine; rule rewards; group advantages; old and reference
logprobs recomputed by the trainer (the engine's are kept to log the mismatch); inner epochs of
shuffled mini-batches through the fused logprob + GRPO loss; the MoE expert-bias update; the new
weights copied into the engine in place; metrics; a checkpoint every N steps; the reference replaced
by the policy every `ref_reset_every` steps. The maths lives in r1mega.ops; this file is the order.

Under torchrun the same order runs on every rank with data parallelism (data_parallel.py): each rank
generates and scores its share of the questions, the rollouts are gathered, each rank runs its share of
every mini-batch on the FSDP-sharded policy (DDP-replicated with model.backend=megatron), and the
metrics are those of the global batch; rank 0
alone writes metrics, plots and progress. Checkpoints are then distributed (parallel/dist_checkpoint.py).
"""

from __future__ import annotations

import copy
import dataclasses
import random
import time

import torch

from r1mega.config import Config
from r1mega.ops.group_advantages import group_advantages
from r1mega.parallel import dist_checkpoint
from r1mega.parallel.launch import fail, shutdown
from r1mega.rewards import ScoringPool
from r1mega.rewards.sandbox import allow_isolation
from r1mega.rollout.engine import SamplingParams, raise_refused
from r1mega.trainers import checkpoint
from r1mega.trainers.components import (
    build_engine, build_policy, build_prompt_sets, build_tokenizer, longest_sequence, pick_device,
)
from r1mega.trainers.cpu_kernels import pin_cpu_kernels
from r1mega.trainers.data_parallel import DataParallel
from r1mega.trainers.evaluate import eval_metrics, generate_and_score, rollout_metrics
from r1mega.trainers.metrics import MetricsLogger
from r1mega.trainers.plots import plot_metrics
from r1mega.trainers.policy_model import (
    engine_weights, expert_load_stats, reset_reference, trainable, update_expert_bias,
)
from r1mega.trainers.policy_update import is_on_policy, sequence_logprobs, update_policy
from r1mega.trainers.prompts import PromptStream
from r1mega.trainers.rollout_batch import RolloutBatch
from r1mega.trainers.schedule import lr_factor, value_at


class GRPOTrainer:
    def __init__(self, cfg: Config, prompts=None):
        """`prompts`: the training prompt stream (take, state_dict, load_state_dict, rows) in place of one over
        the data config's training set (the pipeline's stage 4); the engine is sized for all its rows."""
        self.cfg, algo = cfg, cfg.algo
        pin_cpu_kernels(cfg.train.cpu_isa)
        if cfg.train.cpu_threads > 0:
            torch.set_num_threads(cfg.train.cpu_threads)
        torch.manual_seed(cfg.train.seed)
        self.dp, self.device = DataParallel.launch(cfg, pick_device(cfg.train.device))
        with self.dp.main_first():  # rank 0 fills the caches (tokenizer, base model), the others read them
            self.tokenizer = build_tokenizer(cfg.data, cfg.model)
            train_rows, self.test_rows = build_prompt_sets(cfg.data, cfg.train.seed)
            policy = build_policy(cfg.model, self.tokenizer, cfg.data, cfg.train.seed).to(self.device)
        self.prompts = prompts if prompts is not None else PromptStream(train_rows, cfg.train.seed)
        self.reference = self.dp.parallelize(copy.deepcopy(policy).requires_grad_(False).eval())
        # The engine copies the full weights before the policy is sharded.
        self.engine = build_engine(cfg.rollout, policy, self.tokenizer,
                                   longest_sequence(cfg, self.tokenizer, policy.config,
                                                    {"training": self.prompts.rows, "held-out": self.test_rows}),
                                   self.device)
        self.policy = trainable(cfg.model, policy, self.dp)
        allow_isolation(cfg.reward.sandbox.allow)  # before the pool starts: its workers inherit it
        self.scorer = ScoringPool(list(cfg.reward.components.items()), cfg.reward.num_workers, cfg.reward.timeout)
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=algo.lr, betas=tuple(algo.betas),
                                           weight_decay=algo.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(
            s, warmup_steps=algo.warmup_steps, total_steps=cfg.train.steps, kind=algo.schedule))
        self.shuffle = random.Random(cfg.train.seed)
        self.step, self.nan_streak = 0, 0
        if cfg.train.resume:
            self._resume()
        self.logger = MetricsLogger(cfg.train.out_dir, resume_step=self.step - 1 if cfg.train.resume else None,
                                    tensorboard=cfg.train.tensorboard,
                                    wandb_project=cfg.train.wandb_project) if self.dp.is_main else None

    def sampling(self, step: int) -> SamplingParams:
        rollout = self.cfg.rollout
        return SamplingParams(
            n=self.cfg.algo.group_size, temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k,
            max_new_tokens=value_at(rollout.max_new_tokens, step), stop_token_ids=[self.tokenizer.eos_token_id],
            seed=self.cfg.train.seed * 1_000_003 + step)

    def train_step(self) -> dict[str, float]:
        cfg, algo, step, timings = self.cfg, self.cfg.algo, self.step, {}
        started = time.perf_counter()
        rows = self.dp.local(self.prompts.take(algo.questions_per_step))  # every rank draws all, keeps its share
        groups = self.engine.generate([self.tokenizer.encode(r["prompt"]) for r in rows], self.sampling(step))
        raise_refused(groups, rows)
        samples = [sample for group in groups for sample in group]
        sample_rows = [row for row in rows for _ in range(algo.group_size)]
        timings["time/rollout"] = time.perf_counter() - started
        self.engine.release_memory()  # the KV cache is not needed while the trainer runs

        samples, scores = self.dp.gather(samples, self.scorer.score([s.text for s in samples], sample_rows))
        batch = self.dp.shard(RolloutBatch.from_samples(samples, torch.as_tensor(scores.rewards, dtype=torch.float32)))
        started = time.perf_counter()
        on_policy = is_on_policy(algo)
        if not on_policy:  # else the loss pass takes its own, detached (policy_update.py)
            batch.old_logp = self._logprobs(self.policy, batch)
        if algo.beta > 0:
            batch.ref_logp = self._logprobs(self.reference, batch)
        rewards = batch.rewards
        if algo.kl_in_reward and batch.ref_logp is not None:
            rewards = rewards - algo.beta * ((batch.old_logp - batch.ref_logp) * batch.mask).sum(1)
        batch.advantages = group_advantages(rewards, group_size=algo.group_size, eps=algo.adv_eps,
                                            scale_by_std=algo.scale_by_std)
        stats = self.dp.sum_stats(update_policy(self.policy, self.optimizer, self.scheduler, batch, algo,
                                                temperature=cfg.rollout.temperature, device=self.device,
                                                generator=self.shuffle))
        if on_policy:  # the loss pass filled in this rank's rows
            batch.old_logp = self.dp.sum(batch.old_logp)
        timings["time/train"] = time.perf_counter() - started

        self.dp.sum_expert_load(self.policy)
        expert_stats = expert_load_stats(self.policy)  # the load the bias update acts on
        update_expert_bias(self.policy, algo.expert_bias_rate)
        started = time.perf_counter()
        self.engine.update_weights(engine_weights(self.policy), version=step + 1)  # collective
        self.engine.resume_memory()
        timings["time/weight_sync"] = time.perf_counter() - started
        generated = float(batch.mask.sum())
        timings["throughput/rollout_tokens_per_s"] = generated / timings["time/rollout"]
        timings["throughput/train_tokens_per_s"] = (generated + sum(map(len, batch.prompt_ids))) / timings["time/train"]
        if (step + 1) % algo.ref_reset_every == 0:
            reset_reference(self.reference, self.policy)
        self._count_nan_steps(stats["train/nan_steps"])
        return {**scores.metrics, **rollout_metrics(samples, scores, batch, self.tokenizer), **stats,
                **expert_stats, **timings, "lr": self.scheduler.get_last_lr()[0]}

    def _logprobs(self, model, batch) -> torch.Tensor:
        """Per-token logprobs [S, R] of the whole batch; each data-parallel rank computes its micro-batches."""
        return self.dp.sum(sequence_logprobs(model, batch, temperature=self.cfg.rollout.temperature,
                                             token_budget=self.cfg.algo.token_budget, device=self.device))

    def _count_nan_steps(self, skipped: float) -> None:
        self.nan_streak = self.nan_streak + 1 if skipped else 0
        if self.nan_streak >= self.cfg.algo.max_nan_steps:
            raise FloatingPointError(f"{self.nan_streak} steps in a row had a NaN/inf loss or gradient; stopping")

    def evaluate(self) -> dict[str, float]:
        train = self.cfg.train
        sampling = dataclasses.replace(self.sampling(self.step), n=train.eval_samples, temperature=train.eval_temperature,
                                       top_p=train.eval_top_p, top_k=0, seed=train.seed)
        rollouts = generate_and_score(self.engine, self.tokenizer, self.dp.local(self.test_rows), self.scorer, sampling)
        return eval_metrics(*self.dp.gather(*rollouts))

    def fit(self) -> dict[str, float]:
        """Trains to `train.steps`; returns the last step's metrics (with the held-out evaluation before
        RL as `eval/*_initial` when this run started at step 0)."""
        cfg = self.cfg.train
        first = self.evaluate() if self.step == 0 else None
        if first is not None and self.dp.is_main:
            print(f"held-out accuracy before RL: {first['eval/accuracy']:.3f}")
        progress = _progress(range(self.step, cfg.steps), enabled=cfg.progress and self.dp.is_main)
        for self.step in progress:
            metrics = self.train_step()
            if first is not None and self.step == 0:
                metrics.update({f"{k}_initial": v for k, v in first.items()})
            if (self.step + 1) % cfg.eval_every == 0 or self.step + 1 == cfg.steps:
                metrics.update(self.evaluate())
            if self.logger is not None:
                self.logger.log(self.step, metrics)
            _describe(progress, metrics)
            if (self.step + 1) % cfg.save_every == 0 or self.step + 1 == cfg.steps:
                self.save(self.step + 1)
        if self.logger is None:  # a data-parallel rank other than 0: rank 0 keeps the record
            return {}
        self.logger.close()
        plot_metrics(self.logger.jsonl)
        initial = {k: v for row in self.logger.rows[:1] for k, v in row.items() if k.endswith("_initial")}
        return {**(self.logger.rows[-1] if self.logger.rows else {}), **initial}

    def save(self, next_step: int) -> None:
        """One process: everything in state.pt. Under torchrun: the policy with its optimizer and the
        reference as distributed checkpoints (`policy/`, `reference/`: every rank writes its shards), the
        rest in state.pt; ranks draw from torch's generator in step, so rank 0's state stands for all."""
        state = {
            "step": next_step, "scheduler": self.scheduler.state_dict(), "prompts": self.prompts.state_dict(),
            "shuffle": self.shuffle.getstate(), "nan_streak": self.nan_streak, "torch_rng": torch.get_rng_state(),
            "engine_version": self.engine.version,
        }
        if not self.dp.distributed:
            state.update(policy=self.policy.state_dict(), reference=self.reference.state_dict(),
                         optimizer=self.optimizer.state_dict())
        checkpoint.save(self.cfg.train.out_dir + "/checkpoints", next_step, state, keep=self.cfg.train.keep_checkpoints,
                        shards=self._save_shards if self.dp.distributed else None)

    def _save_shards(self, directory) -> None:
        dist_checkpoint.save(directory / "policy", self.policy, self.optimizer)
        dist_checkpoint.save(directory / "reference", self.reference)

    def _resume(self) -> None:
        path = checkpoint.latest(self.cfg.train.out_dir + "/checkpoints")
        if path is None:
            if self.dp.is_main:
                print(f"resume=true but {self.cfg.train.out_dir}/checkpoints holds no checkpoint: starting afresh")
            return
        state = checkpoint.load(path)
        if (path / "policy").is_dir():  # distributed checkpoints: they load at any layout
            dist_checkpoint.load(path / "policy", self.policy, self.optimizer)
            dist_checkpoint.load(path / "reference", self.reference)
        elif self.dp.distributed:
            raise ValueError(f"{path} was saved by one process; resume it with one process (torchrun resumes "
                             "checkpoints saved under torchrun)")
        else:
            self.policy.load_state_dict(state["policy"])
            self.reference.load_state_dict(state["reference"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.prompts.load_state_dict(state["prompts"])
        self.shuffle.setstate(state["shuffle"])
        self.nan_streak = state["nan_streak"]
        torch.set_rng_state(state["torch_rng"])
        self.engine.update_weights(engine_weights(self.policy), version=state["engine_version"])
        self.step = state["step"]
        if self.dp.is_main:
            print(f"resumed from {path} at step {self.step}")


def _progress(steps, *, enabled: bool):
    if not enabled:
        return steps
    from tqdm import tqdm

    return tqdm(steps, desc="GRPO", dynamic_ncols=True)


def _describe(progress, metrics: dict[str, float]) -> None:
    if hasattr(progress, "set_postfix"):
        progress.set_postfix(reward=f"{metrics.get('reward/mean', 0):.3f}", acc=f"{metrics.get('accuracy', 0):.3f}",
                             len=f"{metrics.get('response_length/mean', 0):.1f}", refresh=False)


def train(cfg: Config) -> dict[str, float]:
    try:
        trainer = GRPOTrainer(cfg)
        try:
            final = trainer.fit()
        finally:
            trainer.scorer.close()
    except Exception as exc:
        fail(exc)  # under torchrun: every rank stops, this one named (r1mega.parallel.launch); else no-op
        raise
    shutdown()
    return final
