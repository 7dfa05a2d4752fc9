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
class ModelConfig:
    # A preset name from r1mega.models.config (e.g. "tiny_deepseek_v3"), used when `path` is unset.
    preset: str = "tiny_deepseek_v3"
    # A local Hugging Face directory or an r1mega native checkpoint directory.
    path: Optional[str] = None
    # "base" pretrains (once, then cached) the tiny preset on synthetic demonstrations before RL.
    init: str = "base"
    dtype: str = "float32"
    # "native" (r1mega's Transformer) or "megatron" (megatron-core GPTModel; GPU, one process).
    backend: str = "native"
    # Sequences per pretraining step and steps, for init=base.
    base_steps: int = 600
    base_batch_size: int = 32
    base_lr: float = 3e-3
    # Share of pretraining demonstrations with a deliberately wrong answer: what RL has to fix.
    base_wrong_rate: float = 0.3
    base_bad_format_rate: float = 0.2


@dataclass
class DataConfig:
    # A synthetic task ("arithmetic", "countdown") or "file" to read `path`.
    task: str = "arithmetic"
    path: Optional[str] = None
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    template: str = "r1_zero"
    difficulty: int = 1
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
    # [[step, max_new_tokens], ...]: the length in force from each step on (paper: 32,768, then 65,536
    # after step 8.2k).
    max_new_tokens: list[list[int]] = field(default_factory=lambda: [[0, 32768], [8200, 65536]])
    max_slots: int = 512
    kv_cache_bytes: int = 0  # 0: sized from max_slots and the longest sequence
    sglang: SGLangConfig = field(default_factory=SGLangConfig)


@dataclass
class AlgoConfig:
    questions_per_step: int = 32
    group_size: int = 16
    mini_batches: int = 16
    inner_epochs: int = 1
    lr: float = 3e-6
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 0
    schedule: str = "constant"  # or "cosine"
    grad_clip: float = 1.0
    beta: float = 0.001
    clip_low: float = 10.0
    clip_high: float = 10.0
    agg: str = "seq-mean-token-mean"
    adv_eps: float = 1e-6
    scale_by_std: bool = True
    kl_in_reward: bool = False
    ref_reset_every: int = 400
    token_budget: int = 16384  # tokens per micro-batch after packing
    expert_bias_rate: float = 0.001
    max_nan_steps: int = 3


@dataclass
class ParallelConfig:
    dp_shard: int = -1  # -1: whatever the other dimensions leave
    dp_replicate: int = 1
    tp: int = 1
    ep: int = 1
    pp: int = 1
    pp_schedule: str = "1f1b"  # or "interleaved_1f1b"
    pp_stages_per_rank: int = 1  # > 1 with the interleaved schedule
    pp_microbatches: int = 0  # 0: one per pipeline stage
    activation_checkpointing: str = "none"  # "none", "full", "selective"


@dataclass
class TrainConfig:
    steps: int = 10400
    seed: int = 0
    out_dir: str = "runs/default"
    save_every: int = 50
    keep_checkpoints: int = 2
    resume: bool = False
    eval_every: int = 50
    # Held-out evaluation as the paper reports pass@1: the mean correctness of k samples at T=0.6, top-p 0.95.
    eval_samples: int = 4
    eval_temperature: float = 0.6
    eval_top_p: float = 0.95
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
