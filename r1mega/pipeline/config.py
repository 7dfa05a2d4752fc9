"""The schema of `r1mega-pipeline`: the GRPO `Config` (r1mega/config.py) plus a `pipeline` section.

The top-level keys (model, data, reward, rollout, algo, parallel, train) are the settings every GRPO
stage starts from, exactly as `r1mega-train` reads them; each stage below changes only what the paper
changes between stages (steps, rewards, temperature, data). `model.*` describes the *base* model
(stage 0 and the SFT of stages 1 and 3 start from it); `train.out_dir` is unused (stages write under
`pipeline.out_dir`). Defaults are the paper's where it gives one (R1_SPEC.md); `conf/pipeline/tiny.yaml`
sizes everything for a 2-core CPU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from r1mega.config import Config
from r1mega.eval.run import EvalSettings
from r1mega.pipeline.rejection import RejectionSettings

STAGES = ("r1_zero", "cold_start", "reasoning_rl", "rejection_sft", "all_scenario_rl", "distill", "student_rl")


@dataclass
class RLStage:
    steps: int = 1700
    temperature: float = 1.0
    lr: Optional[float] = None  # None: algo.lr
    reward: dict[str, float] = field(default_factory=lambda: {"math_accuracy": 1.0, "format_r1_zero": 1.0})


@dataclass
class SFTStage:
    epochs: float = 2.0
    batch_size: int = 32
    lr: float = 5e-5
    schedule: str = "cosine"  # or "constant"; after a linear warm-up
    warmup_steps: Optional[int] = None  # None: 5% of the steps
    max_len: int = 4096  # longer examples (prompt + response tokens) are dropped
    # A jsonl of {"prompt","response"} or {"messages"} rows; None: the stage's synthetic data.
    path: Optional[str] = None
    size: int = 4096  # synthetic examples, when path is None


@dataclass
class RejectionStage:
    prompts: int = 1024  # training prompts sampled from
    sampling: RejectionSettings = field(default_factory=RejectionSettings)
    reward: dict[str, float] = field(default_factory=lambda: {"math_accuracy": 1.0, "format_r1_zero": 1.0})
    non_reasoning_share: float = 0.25  # the paper: ~200k of ~800k
    non_reasoning_path: Optional[str] = None  # jsonl {"prompt","response"}; None: synthetic general rows


@dataclass
class RewardModelStage:
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-4
    max_len: int = 512
    pairs: int = 2048  # synthetic preference pairs, when path is None
    path: Optional[str] = None  # jsonl {"prompt","chosen","rejected"}; None: synthetic pairs


@dataclass
class AllScenarioStage(RLStage):
    temperature: float = 0.7
    # Reward = reasoning (accuracy + format) + general (reward model + format) + language.
    reward: dict[str, float] = field(default_factory=lambda: {
        "math_accuracy": 1.0, "format_r1_zero": 1.0, "helpful_rm": 1.0, "language_consistency": 1.0})
    general_share: float = 0.25  # share of general (non-reasoning) prompts once they join
    # General prompts (and so the reward model that scores them) join for the last `general_steps` steps
    # only; None: the paper's share of `steps`, the final 400 of 1,700 (7 of 30).
    general_steps: Optional[int] = None
    general_path: Optional[str] = None  # jsonl {"prompt"}; None: synthetic general prompts
    reward_model: RewardModelStage = field(default_factory=RewardModelStage)


def _tiny_qwen2() -> dict[str, Any]:
    return {"architecture": "Qwen2ForCausalLM", "hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "attention_bias": True, "tie_word_embeddings": True,
            "max_position_embeddings": 4096}


@dataclass
class DistillStage(SFTStage):
    # The student: a local Hugging Face or native checkpoint (it keeps its own tokenizer), or, when
    # None, a dense model built from `student` (r1mega.models.ModelConfig fields; the vocabulary is the
    # pipeline tokenizer's) that starts as the base model did: pretrained on the same demonstrations
    # with model.init=base (cached like the base), random with model.init=random.
    student_path: Optional[str] = None
    student: dict[str, Any] = field(default_factory=_tiny_qwen2)
    # Its data: rejection sampling (pipeline.rejection's settings) from stage 4's model, mixed with
    # non-reasoning rows as stage 3's.


@dataclass
class StudentRLStage(RLStage):
    # The paper's comparison: the distillation student trained with GRPO alone (from the same start) for
    # `steps` optimizer steps; None: as many as the distillation's SFT took.
    steps: Optional[int] = None


@dataclass
class PipelineEval:
    # Synthetic task names (their held-out split) or prompt files with "prompt"/"answer".
    datasets: list[str] = field(default_factory=lambda: ["arithmetic"])
    size: int = 256
    sampling: EvalSettings = field(default_factory=lambda: EvalSettings(n=16, pass_k=[1, 4, 16]))


@dataclass
class PipelineSettings:
    out_dir: str = "runs/pipeline"
    # Stages before `start_stage` must have finished (they are loaded, not rerun); stages from it on run
    # again even when finished. With start_stage=0, a finished stage is skipped, an unfinished one resumed.
    start_stage: int = 0
    stop_stage: int = 6  # the last stage run
    r1_zero: RLStage = field(default_factory=lambda: RLStage(steps=10400))
    cold_start: SFTStage = field(default_factory=SFTStage)
    reasoning_rl: RLStage = field(default_factory=lambda: RLStage(reward={
        "math_accuracy": 1.0, "format_r1_zero": 1.0, "language_consistency": 1.0}))
    rejection: RejectionStage = field(default_factory=RejectionStage)
    rejection_sft: SFTStage = field(default_factory=SFTStage)
    all_scenario_rl: AllScenarioStage = field(default_factory=AllScenarioStage)
    distill: DistillStage = field(default_factory=DistillStage)
    student_rl: StudentRLStage = field(default_factory=StudentRLStage)
    eval: PipelineEval = field(default_factory=PipelineEval)


@dataclass
class PipelineConfig(Config):
    pipeline: PipelineSettings = field(default_factory=PipelineSettings)


def register_pipeline_configs() -> None:
    ConfigStore.instance().store(name="r1mega_pipeline_schema", node=PipelineConfig)
