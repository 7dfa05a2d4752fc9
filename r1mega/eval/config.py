"""The Hydra schema of `r1mega-eval`: which checkpoint, which question sets, how to sample.

Defaults follow the paper's protocol (R1_SPEC.md, Evaluation): k samples per question at temperature
0.6 and top-p 0.95, pass@1 as the mean correctness over them, cons@k by majority vote.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore

from r1mega.config import SandboxConfig
from r1mega.eval.run import EvalSettings


@dataclass
class EvalConfig:
    model_path: Optional[str] = None  # a native or Hugging Face checkpoint directory (required)
    tokenizer: Optional[str] = None  # a tokenizer directory; None: the model's own, else the default
    # Synthetic task names (their held-out split) or prompt files with "prompt"/"answer" fields.
    datasets: list[str] = field(default_factory=lambda: ["arithmetic"])
    template: str = "r1_zero"
    size: int = 256  # questions per dataset at most
    difficulty: int = 1  # of synthetic tasks
    sampling: EvalSettings = field(default_factory=EvalSettings)
    out_dir: str = "runs/eval"
    device: str = "auto"
    max_slots: int = 256
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)  # code rewards: weaker isolation allowed


def register_eval_configs() -> None:
    ConfigStore.instance().store(name="r1mega_eval_schema", node=EvalConfig)
