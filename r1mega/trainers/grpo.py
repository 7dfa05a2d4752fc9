"""GRPO, as DeepSeek-R1 trains with it: the driver of a run.

A step is the paper's: one optimizer step on one mini-batch. Each rollout: `train_batch_size`
questions x G samples from the engine; rule rewards; group advantages; old and reference logprobs
recomputed by the trainer (the engine's are kept to log the mismatch); inner epochs of shuffled
mini-batches through the fused logprob + GRPO loss, one step each (R1-Zero: 8,192 samples, 16 steps
of 512); the MoE expert-bias update (once per rollout, from the load of all its steps); the new
weights copied into the engine in place; one row of metrics, keyed by the steps done; a checkpoint,
an evaluation, a reference reset when the rollout's steps reach a multiple of their interval. What
changes with the step (learning rate, max_new_tokens) takes its value at the rollout's first step.
With algo.routing_replay the engine records every token's experts and the policy's old and current
logprob passes route to them (R3, r1mega/models/routing.py); the reference routes itself.
The maths lives in r1mega.ops; this file is the order.

Beside the paper's GRPO, all off by default: DAPO's overlong shaping, RLOO and REINFORCE++ advantages,
GSPO's sequence ratio and rollout correction (algo.*, picked in algorithms.py); where the samples come
from, with DAPO's dynamic sampling, partial rollouts, or generated ahead while the trainer trains
(rollout_source.py; the engine then keeps its KV cache, since it generates during training).

Under torchrun the same order runs on every rank with data parallelism (data_parallel.py): each rank
generates and scores its share of the questions, the rollouts are gathered, each rank runs its share of
every mini-batch on the FSDP-sharded policy (DDP-replicated with model.backend=megatron; cut into
pipeline stages with parallel.pp > 1, the loss on the last stage), and the metrics are those of the
global batch; rank 0 alone writes metrics, plots and progress. Checkpoints are then distributed
(parallel/dist_checkpoint.py).
"""

from __future__ import annotations

import copy
import dataclasses
import random
import time

import torch

from r1mega.config import Config
from r1mega.parallel import dist_checkpoint
from r1mega.parallel.launch import fail, shutdown
from r1mega.rewards import ScoringPool
from r1mega.rewards.sandbox import allow_isolation
from r1mega.rollout.engine import SamplingParams
from r1mega.trainers import checkpoint
from r1mega.trainers.algorithms import advantages, check_algo, correct_rollouts, corrects_rollouts, shaped_rewards
from r1mega.trainers.components import (
    build_engine, build_policy, build_prompt_sets, build_tokenizer, longest_sequence, pick_device,
)
from r1mega.trainers.cpu_kernels import pin_cpu_kernels
from r1mega.trainers.data_parallel import DataParallel
from r1mega.trainers.evaluate import eval_metrics, generate_and_score, held_out_report, rollout_metrics
from r1mega.trainers.metrics import MetricsLogger
from r1mega.trainers.plots import plot_metrics
from r1mega.trainers.policy_model import policy_for_backend
from r1mega.trainers.policy_update import (
    is_on_policy, sequence_kl, sequence_logprobs, steps_per_rollout, update_policy,
)
from r1mega.trainers.prompts import PromptStream
from r1mega.trainers.rollout_batch import RolloutBatch
from r1mega.trainers.rollout_source import RolloutSource
from r1mega.trainers.schedule import lr_factor, value_at


class GRPOTrainer:
    def __init__(self, cfg: Config, prompts=None):
        """`prompts`: the training prompt stream (take, state_dict, load_state_dict, rows) in place of one over
        the data config's training set (the pipeline's stage 4); the engine is sized for all its rows."""
        self.cfg, algo = cfg, cfg.algo
        self.steps_per_rollout = steps_per_rollout(algo)
        check_algo(algo)
        if algo.routing_replay and cfg.parallel.pp > 1:
            raise ValueError(f"algo.routing_replay=true with parallel.pp={cfg.parallel.pp}: a pipeline's stages do not "
                             "replay routing yet; set parallel.pp=1 or algo.routing_replay=false")
        if algo.ref_reset_every % self.steps_per_rollout:
            raise ValueError(f"algo.ref_reset_every={algo.ref_reset_every} must be a multiple of the steps of a "
                             f"rollout ({self.steps_per_rollout}: algo.inner_epochs * algo.train_batch_size / "
                             "algo.ppo_mini_batch_size): the reference is replaced between rollouts")
        pin_cpu_kernels(cfg.train.cpu_isa)
        if cfg.train.cpu_threads > 0:
            torch.set_num_threads(cfg.train.cpu_threads)
        torch.manual_seed(cfg.train.seed)
        self.dp, self.device = DataParallel.launch(cfg, pick_device(cfg.train.device))
        with self.dp.main_first():  # rank 0 fills the caches (tokenizer, base model), the others read them
            self.tokenizer = build_tokenizer(cfg.data, cfg.model)
            train_rows, self.held_out = build_prompt_sets(cfg.data, cfg.train.seed)
            policy = build_policy(cfg.model, self.tokenizer, cfg.data, cfg.train.seed).to(self.device)
        self.prompts = prompts if prompts is not None else PromptStream(train_rows, cfg.train.seed)
        self.reference = self.dp.parallelize(copy.deepcopy(policy).requires_grad_(False).eval())
        # The engine copies the full weights before the policy is sharded.
        self.engine = build_engine(cfg.rollout, policy, self.tokenizer,
                                   longest_sequence(cfg, self.tokenizer, policy.config,
                                                    {"training": self.prompts.rows, **self.held_out}),
                                   self.device, record_routing=algo.routing_replay)
        self.policy = policy_for_backend(cfg.model, policy, self.dp)
        allow_isolation(cfg.reward.sandbox.allow)  # before the pool starts: its workers inherit it
        self.scorer = ScoringPool(list(cfg.reward.components.items()), cfg.reward.num_workers, cfg.reward.timeout)
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=algo.lr, betas=tuple(algo.betas),
                                           weight_decay=algo.weight_decay)
        self.shuffle = random.Random(cfg.train.seed)
        self.rollouts = RolloutSource(cfg, self.engine, self.tokenizer, self.prompts, self.scorer, self.dp,
                                      lambda index: self.sampling(index))
        self.step, self.rollout, self.nan_streak = 0, 0, 0  # optimizer steps and rollouts done
        if cfg.train.resume:
            self._resume()
        self.logger = MetricsLogger(cfg.train.out_dir, resume_step=self.step if cfg.train.resume else None,
                                    tensorboard=cfg.train.tensorboard,
                                    wandb_project=cfg.train.wandb_project) if self.dp.is_main else None

    def sampling(self, index: int | None = None) -> SamplingParams:
        """Rollout `index`'s (default: the next one): its length is the schedule's at its first step, its seed
        the rollout's."""
        rollout = self.cfg.rollout
        first_step = self.step if index is None else index * self.steps_per_rollout
        index = self.rollout if index is None else index
        return SamplingParams(
            n=self.cfg.algo.group_size, temperature=rollout.temperature, top_p=rollout.top_p, top_k=rollout.top_k,
            max_new_tokens=value_at(rollout.max_new_tokens, first_step), stop_token_ids=[self.tokenizer.eos_token_id],
            seed=self.cfg.train.seed * 1_000_003 + index)

    def lr(self, step: int) -> float:
        cfg = self.cfg
        return cfg.algo.lr * lr_factor(step, warmup_steps=cfg.algo.warmup_steps, total_steps=cfg.train.steps,
                                       kind=cfg.algo.schedule)

    def train_step(self) -> dict[str, float]:
        """One rollout and its optimizer steps (fewer when train.steps comes first); advances `step`."""
        cfg, algo, timings = self.cfg, self.cfg.algo, {}
        steps = min(self.steps_per_rollout, cfg.train.steps - self.step)
        if steps <= 0:
            raise RuntimeError(f"train.steps={cfg.train.steps} already reached")
        sampling, samples, scores, generation_s, sampling_stats = self.rollouts.next(self.rollout)
        timings["time/rollout"] = generation_s

        lengths = torch.tensor([len(s.token_ids) for s in samples])
        rewards, shaping_stats = shaped_rewards(torch.as_tensor(scores.rewards, dtype=torch.float32), lengths, algo,
                                                sampling.max_new_tokens)
        batch = self.dp.shard(RolloutBatch.from_samples(samples, rewards))
        started = time.perf_counter()
        on_policy = is_on_policy(algo)
        if not on_policy:  # else the loss pass takes its own, detached (policy_update.py)
            batch.old_logp = self._logprobs(self.policy, batch, replay_routing=algo.routing_replay)
        if algo.beta > 0:
            batch.ref_logp = self._logprobs(self.reference, batch)
        rewards, kl_stats = batch.rewards, {}
        if algo.kl_in_reward and batch.ref_logp is not None:  # the KL leaves the loss for the reward (config.py)
            kl = sequence_kl(batch.old_logp, batch.ref_logp, batch.mask)  # [S]
            rewards = rewards - algo.beta * kl
            kl_stats = {"train/kl": float(kl.sum() / batch.mask.sum().clamp(min=1)),
                        "reward/kl_penalty": float(algo.beta * kl.mean())}
        batch.advantages = advantages(rewards, batch.mask, algo)
        correction_stats = correct_rollouts(batch, algo.correction) if corrects_rollouts(algo) else {}
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr(self.step)
        update = update_policy(self.policy, self.optimizer, batch, algo, max_new_tokens=sampling.max_new_tokens,
                               temperature=cfg.rollout.temperature, device=self.device, generator=self.shuffle,
                               steps=steps, on_step=self._count_nan_step)
        if on_policy:
            batch.old_logp = update.logp
        timings["time/train"] = time.perf_counter() - started

        self.policy.sum_expert_load(self.dp.group)
        expert_stats = self.policy.expert_load_stats()  # the load the bias update acts on
        self.policy.update_expert_bias(algo.expert_bias_rate)
        timings.update(self.rollouts.wait())  # the engine's weights change only between generations
        started = time.perf_counter()
        before, self.step, self.rollout = self.step, self.step + steps, self.rollout + 1
        self.engine.update_weights(self.policy.engine_weights(), version=self.step)  # collective
        self.engine.resume_memory()
        timings["time/weight_sync"] = time.perf_counter() - started
        generated = float(batch.mask.sum())
        timings["throughput/rollout_tokens_per_s"] = generated / generation_s
        timings["throughput/train_tokens_per_s"] = (generated + sum(map(len, batch.prompt_ids))) / timings["time/train"]
        if _reached(algo.ref_reset_every, before, self.step):
            self.policy.load_into_reference(self.reference)
        return {**scores.metrics, **rollout_metrics(samples, scores, batch, self.tokenizer), **update.stats, **kl_stats,
                **sampling_stats, **shaping_stats, **correction_stats, **expert_stats, **timings, "lr": self.lr(self.step)}

    def _logprobs(self, model, batch, replay_routing: bool = False) -> torch.Tensor:
        """Per-token logprobs [S, R] of the whole batch; each data-parallel rank computes its micro-batches."""
        return sequence_logprobs(model, batch, temperature=self.cfg.rollout.temperature,
                                 token_budget=self.cfg.algo.token_budget, device=self.device,
                                 replay_routing=replay_routing)

    def _count_nan_step(self, finite: bool) -> None:
        self.nan_streak = 0 if finite else self.nan_streak + 1
        if self.nan_streak >= self.cfg.algo.max_nan_steps:
            raise FloatingPointError(f"{self.nan_streak} steps in a row had a NaN/inf loss or gradient; stopping")

    def evaluate(self) -> dict[str, float]:
        """Every held-out split by the paper's protocol: pass@1 over train.eval_sampling's samples
        (`eval/accuracy`), and one greedy response (`eval/greedy_accuracy`)."""
        train, out = self.cfg.train, {}
        rollout, settings = self.sampling(), train.eval_sampling
        sampled = dataclasses.replace(settings, stop_token_ids=[*settings.stop_token_ids, self.tokenizer.eos_token_id],
                                      max_new_tokens=settings.max_new_tokens or rollout.max_new_tokens,
                                      seed=train.seed if settings.seed is None else settings.seed)
        protocols = {"": sampled}
        if train.eval_greedy:
            protocols["greedy_"] = dataclasses.replace(sampled, n=1, temperature=0.0, top_p=1.0)
        for split, rows in self.held_out.items():
            for name, sampling in protocols.items():
                rollouts = generate_and_score(self.engine, self.tokenizer, self.dp.local(rows), self.scorer, sampling)
                out.update(eval_metrics(*self.dp.gather(*rollouts), prefix=f"{split}/{name}"))
        return out

    def fit(self) -> dict[str, float]:
        """Trains to `train.steps`; returns the last step's metrics (with the held-out evaluation before
        RL as `eval/*_initial` when this run started at step 0)."""
        cfg = self.cfg.train
        first = self.evaluate() if self.step == 0 else None
        if first is not None and self.dp.is_main:
            print("\n".join(["before RL:", *held_out_report(first)]))
        progress = _progress(self.step, cfg.steps, enabled=cfg.progress and self.dp.is_main)
        while self.step < cfg.steps:
            before = self.step
            metrics = self.train_step()
            if first is not None and before == 0:
                metrics.update({f"{k}_initial": v for k, v in first.items()})
            if _reached(cfg.eval_every, before, self.step) or self.step == cfg.steps:
                metrics.update(self.evaluate())
            if self.logger is not None:
                self.logger.log(self.step, metrics)
            _describe(progress, self.step - before, metrics)
            if _reached(cfg.save_every, before, self.step) or self.step == cfg.steps:
                self.save()
        if progress is not None:
            progress.close()
        if self.logger is None:  # a data-parallel rank other than 0: rank 0 keeps the record
            return {}
        self.logger.close()
        plot_metrics(self.logger.jsonl)
        initial = {k: v for row in self.logger.rows[:1] for k, v in row.items() if k.endswith("_initial")}
        return {**(self.logger.rows[-1] if self.logger.rows else {}), **initial}

    def save(self) -> None:
        """One process: everything in state.pt. Under torchrun: the policy with its optimizer and the
        reference as distributed checkpoints (`policy/`, `reference/`: every rank writes its shards), the
        rest in state.pt; ranks draw from torch's generator in step, so rank 0's state stands for all."""
        state = {
            "step": self.step, "rollout": self.rollout, "prompts": self.prompts.state_dict(),
            "shuffle": self.shuffle.getstate(), "nan_streak": self.nan_streak, "torch_rng": torch.get_rng_state(),
            "engine_version": self.engine.version,
            "rollouts": self.rollouts.state_dict(),
        }
        if not self.dp.distributed:
            state.update(policy=self.policy.state_dict(), reference=self.reference.state_dict(),
                         optimizer=self.optimizer.state_dict())
        checkpoint.save(self.cfg.train.out_dir + "/checkpoints", self.step, state, keep=self.cfg.train.keep_checkpoints,
                        shards=self._save_shards if self.dp.distributed else None)

    def _save_shards(self, directory) -> None:
        dist_checkpoint.save(directory / "policy", self.policy, self.optimizer)
        dist_checkpoint.save(directory / "reference", self.reference)
        self.rollouts.save_rank(directory)

    def _resume(self) -> None:
        path = checkpoint.latest(self.cfg.train.out_dir + "/checkpoints")
        if path is None:
            if self.dp.is_main:
                print(f"resume=true but {self.cfg.train.out_dir}/checkpoints holds no checkpoint: starting afresh")
            return
        state = checkpoint.load(path)
        if "rollout" not in state:
            raise ValueError(f"{path} counts its steps in rollouts (saved before a step was one optimizer step): "
                             "it cannot be resumed; start afresh with train.resume=false")
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
        self.prompts.load_state_dict(state["prompts"])
        self.shuffle.setstate(state["shuffle"])
        self.nan_streak = state["nan_streak"]
        torch.set_rng_state(state["torch_rng"])
        self.engine.update_weights(self.policy.engine_weights(), version=state["engine_version"])
        self.step, self.rollout = state["step"], state["rollout"]
        self.rollouts.load_state_dict(state.get("rollouts", {}))
        if self.dp.distributed:
            self.rollouts.load_rank(path)
        if self.dp.is_main:
            print(f"resumed from {path} at step {self.step}")


def _reached(every: int, before: int, after: int) -> bool:
    """Whether the steps from `before` to `after` reached a multiple of `every`."""
    return after // every > before // every


def _progress(done: int, total: int, *, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, desc="GRPO", unit="step", dynamic_ncols=True)


def _describe(progress, steps: int, metrics: dict[str, float]) -> None:
    if progress is not None:
        progress.set_postfix(reward=f"{metrics.get('reward/mean', 0):.3f}", acc=f"{metrics.get('accuracy', 0):.3f}",
                             len=f"{metrics.get('response_length/mean', 0):.1f}", refresh=False)
        progress.update(steps)


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
