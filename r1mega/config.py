"""The schema of every configuration: dataclasses registered in Hydra's ConfigStore.

These dataclasses are the only schema. YAML files under `conf/` only choose values, so a key that is
not declared here, or a value of the wrong type, fails when Hydra composes the config, before any
work, with the key's name in the message. Defaults are the paper's (R1_SPEC.md) where it states one;
the embedded tiny experiment (`conf/experiment/tiny.yaml`) overrides what a CPU run needs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class SamplingParams:
    """How to sample, the one type for it: what a rollout engine is asked (r1mega/rollout/engine.py),
    and, as a Hydra node, the settings of every stage that samples: held-out evaluation, rejection
    sampling, the trainer's evaluation (eval/run.py, pipeline/rejection.py, TrainConfig.eval_sampling)."""

    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # 1: off
    top_k: int = 0  # 0: off
    max_new_tokens: int = 256
    stop_token_ids: list[int] = field(default_factory=list)  # generation ends on any; the token is kept in token_ids
    stop: list[str] = field(default_factory=list)  # stop strings; the text ends right after the first one (included)
    n: int = 1  # samples per prompt
    # Sample j of a prompt draws from a generator seeded by (seed, prompt ids, j): the same seed, prompt
    # and j give the same tokens whatever else is in the batch (so a prompt listed twice gets the same
    # samples twice). None: a seed drawn from torch's default generator.
    seed: Optional[int] = None


@dataclass
class ModelConfig:
    # A preset name from r1mega.models.config (e.g. "tiny_deepseek_v3"), used when `path` is unset.
    preset: str = "tiny_deepseek_v3"
    # A local Hugging Face directory or an r1mega native checkpoint directory.
    path: Optional[str] = None
    # Without `path`: "base" pretrains (once, then cached) the preset on synthetic demonstrations
    # before RL, "random" trains the preset from random weights (tests); anything else needs `path`,
    # which, when set, is loaded whatever `init` says.
    init: str = "base"
    # The policy's, the reference's and the native engine's weights. float32 only: AdamW steps the
    # policy's own weights (no fp32 master copy), which in bfloat16 would lose updates smaller than
    # 1/256 of a weight. SGLang's rollout weights have their own dtype (rollout.sglang.dtype).
    dtype: str = "float32"
    # "native" (r1mega's Transformer) or "megatron" (megatron-core GPTModel; GPU, one process).
    backend: str = "native"
    # Sequences per pretraining step and steps, for init=base.
    base_steps: int = 600
    base_batch_size: int = 32
    base_lr: float = 3e-3
    # How the pretraining demonstrations are written (r1mega/data/tasks/strategies.py, `chain` only):
    # strategy -> share, and the chance that a hard worked operation slips. Other tasks have the one strategy
    # "steps", whose final answer is then wrong with probability base_slip_rate.
    base_strategies: dict[str, float] = field(default_factory=lambda: {"steps": 1.0})
    base_slip_rate: float = 0.0
    base_bad_format_rate: float = 0.0  # share of demonstrations with broken tags
    # Difficulties of the pretraining questions; empty: data.difficulty alone.
    base_difficulties: list[int] = field(default_factory=list)


@dataclass
class DataConfig:
    # A synthetic task ("arithmetic", "countdown") or "file" to read `path`.
    task: str = "arithmetic"
    path: Optional[str] = None
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    template: str = "r1_zero"
    difficulty: int = 1
    # A second held-out split of a synthetic task at this difficulty (metrics eval_hard/*), e.g. chains
    # longer than any training question: what RL taught that generalises rather than what it memorised.
    hard_difficulty: Optional[int] = None
    train_size: int = 20000
    test_size: int = 256
    tokenizer: Optional[str] = None  # a local tokenizer directory; None builds the default


@dataclass
class SandboxConfig:
    # The code sandbox's isolation modes weaker than its strongest ("namespace") that may be used by
    # name, e.g. [none] on a machine without namespaces; r1mega/rewards/sandbox.py says what each gives.
    allow: list[str] = field(default_factory=list)


@dataclass
class RewardConfig:
    # name -> weight, chosen by a conf/reward/ preset (default `rule`: accuracy + format, equal weights).
    components: dict[str, float] = field(default_factory=dict)
    num_workers: int = 0
    timeout: float = 10.0
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)


@dataclass
class SGLangConfig:
    """How the SGLang engine is built (rollout.engine=sglang)."""

    url: str = ""  # a running server (same node, for CUDA IPC weight updates); empty: in-process sglang.Engine
    tp_size: int = 1
    mem_fraction_static: float = 0.5  # GPU memory share SGLang takes for weights + KV cache
    dtype: str = "bfloat16"  # the engine's weights; updates are cast to it before sending
    bucket_bytes: int = 256 << 20
    deterministic: bool = False  # --enable-deterministic-inference and per-sample seeds
    timeout_s: float = 3600.0  # per generate call
    server_args: dict[str, Any] = field(default_factory=dict)  # more sglang ServerArgs (in-process only)


@dataclass
class RolloutConfig:
    engine: str = "native"
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    # [[step, max_new_tokens], ...]: the length in force from each step on, read at each rollout's first
    # step (paper: 32,768, then 65,536 after step 8.2k: from the rollout at step 8,208 on with 16 a rollout).
    max_new_tokens: list[list[int]] = field(default_factory=lambda: [[0, 32768], [8200, 65536]])
    max_slots: int = 512
    kv_cache_bytes: int = 0  # 0: sized from max_slots and the longest sequence
    # Asynchronous rollouts (r1mega/trainers/rollout_queue.py): rollout k trains on samples generated by the
    # weights of rollout k - staleness, generated in the background while rollout k - staleness trained
    # (1: one-step-off). In rollouts, i.e. engine weight updates. 0: synchronous, as the paper.
    staleness: int = 0
    # Partial rollouts (r1mega/trainers/partial_rollouts.py): each generation gives every sample at most
    # `partial_tokens` new tokens (0: off), and `partial_groups` questions beyond the batch stay in flight; a
    # batch is the first train_batch_size questions to finish, the others continue in the next rollout.
    partial_tokens: int = 0
    partial_groups: int = 0
    sglang: SGLangConfig = field(default_factory=SGLangConfig)


@dataclass
class CorrectionConfig:
    """Rollout correction (r1mega/ops/rollout_correction.py): the engine's samples reweighted or dropped
    where pi_old (the trainer's) and pi_engine disagree. Off by default, as in the paper's recipe; any of
    it makes the trainer compute old logprobs before the loss, on-policy too."""

    # Truncated importance sampling of the policy term: "none", "token" (w = min(rho_t, cap)) or
    # "sequence" (w = min(prod_t rho_t, cap)); rho = pi_old / pi_engine.
    weights: str = "none"
    weight_cap: float = 2.0
    # Masked IS: "none", "token" (tokens with rho outside [1/threshold, threshold] leave the loss),
    # "sequence" (whole sequences, by prod_t rho_t) or "geometric" (by exp(mean_t log rho_t)).
    mask: str = "none"
    mask_threshold: float = 2.0


@dataclass
class AlgoConfig:
    # Batch sizes count questions (prompts), as verl's do. Each rollout generates `train_batch_size`
    # questions x `group_size` samples, split at random into mini-batches of `ppo_mini_batch_size`
    # questions' worth of samples. A step is one optimizer step on one mini-batch, so a rollout is
    # inner_epochs * train_batch_size / ppo_mini_batch_size steps (the paper: 8,192 outputs per rollout,
    # 16 steps of 32 x 16 = 512). Every count of steps (train.steps, *_every, warmup_steps, the
    # rollout.max_new_tokens schedule) is in these steps.
    train_batch_size: int = 512
    ppo_mini_batch_size: int = 32
    group_size: int = 16
    inner_epochs: int = 1
    lr: float = 3e-6
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    # Linear warm-up, then constant or cosine to 0 at train.steps; a rollout's steps all take the value
    # at its first step (the learning rate changes between rollouts, not within one).
    warmup_steps: int = 0
    schedule: str = "constant"  # or "cosine"
    grad_clip: float = 1.0
    beta: float = 0.001
    clip_low: float = 10.0
    clip_high: float = 10.0
    agg: str = "seq-mean-token-mean"
    adv_eps: float = 1e-6
    scale_by_std: bool = True
    # True: no KL term in the loss; instead beta * sum over the response of the k1 estimator
    # (log pi_old - log pi_ref, per token) is subtracted from each sample's reward before the group
    # advantages. train/kl then logs that k1 estimate per token, reward/kl_penalty the mean amount
    # subtracted. False: the loss's k3 term (r1mega/ops/grpo_loss.py), logged as train/kl.
    kl_in_reward: bool = False
    # The reference is replaced by the policy after every this many steps (a multiple of a rollout's steps).
    ref_reset_every: int = 400
    token_budget: int = 16384  # tokens per micro-batch after packing
    expert_bias_rate: float = 0.001
    max_nan_steps: int = 3  # optimizer steps in a row skipped for a NaN/inf loss or gradient stop the run
    # MoE routing replay (R3): the native engine records the experts it routed every token to, and the
    # policy's old and current logprob passes route to them, with their own router weights (the reference
    # routes itself); native and megatron policies, expert parallel included; rollout.engine=native only.
    # False: the paper's recipe, every model routes itself.
    routing_replay: bool = False
    # What is beside the paper's GRPO (presets in conf/algo/: dapo, gspo, rloo, reinforce_pp); the defaults are
    # the paper's. Advantages: "grpo" (group mean/std), "rloo" (leave-one-out), "reinforce_pp" (batch-whitened
    # rewards), "reinforce_pp_baseline" (group mean removed, then batch-whitened): r1mega/ops/outcome_advantages.py.
    advantage: str = "grpo"
    # "token" (PPO's per-token ratio) or "sequence" (GSPO's length-normalised sequence ratio).
    ratio: str = "token"
    # DAPO's dynamic sampling: groups whose rewards (before the length penalty) are all equal are dropped and
    # more questions generated, for at most `max_sampling_rounds` generation rounds a rollout.
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 3
    # DAPO's overlong shaping: the last `overlong_buffer` share of max_new_tokens costs up to
    # `overlong_penalty` reward, linearly (r1mega/rewards/overlong.py); 0: off.
    overlong_buffer: float = 0.0
    overlong_penalty: float = 1.0
    correction: CorrectionConfig = field(default_factory=CorrectionConfig)


@dataclass
class ParallelConfig:
    dp_shard: int = -1  # -1: whatever the other dimensions leave
    dp_replicate: int = 1
    tp: int = 1
    ep: int = 1
    pp: int = 1  # pipeline stages' ranks (r1mega/parallel/pipeline.py), native backend
    pp_schedule: str = "1f1b"  # or "interleaved_1f1b" (r1mega/parallel/pipeline_schedule.py)
    pp_stages_per_rank: int = 1  # 1 for 1f1b, >= 2 for interleaved_1f1b
    activation_checkpointing: str = "none"  # "none", "full", "selective" (r1mega/parallel/checkpointing.py)


@dataclass
class TrainConfig:
    # Optimizer steps (algo.train_batch_size says how many a rollout makes); a last rollout that would
    # pass `steps` trains only its first mini-batches.
    steps: int = 10400
    seed: int = 0
    out_dir: str = "runs/default"
    # A checkpoint, and a held-out evaluation, after each rollout in which the step count reaches a
    # multiple of these (and after the last).
    save_every: int = 50
    keep_checkpoints: int = 2
    resume: bool = False
    eval_every: int = 50
    # Held-out evaluation as the paper reports pass@1: the mean correctness of n samples at T=0.6, top-p 0.95
    # (eval/accuracy), and of one greedy response (eval/greedy_accuracy) when eval_greedy. The model's EOS
    # always stops a response; max_new_tokens 0: the rollouts' (rollout.max_new_tokens at the step), seed
    # None: train.seed.
    eval_sampling: SamplingParams = field(default_factory=lambda: SamplingParams(
        n=4, temperature=0.6, top_p=0.95, max_new_tokens=0))
    eval_greedy: bool = True
    device: str = "auto"
    cpu_threads: int = 0  # torch's intra-op threads on CPU; 0 keeps torch's default
    # CPU kernels pinned to one instruction set (r1mega/trainers/cpu_kernels.py): the same numbers on every
    # x86-64 processor that has it; "" keeps what torch, MKL and oneDNN pick.
    cpu_isa: str = ""
    tensorboard: bool = True
    wandb_project: Optional[str] = None
    progress: bool = True


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def register_configs() -> None:
    ConfigStore.instance().store(name="r1mega_schema", node=Config)
