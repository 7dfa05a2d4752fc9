"""The schema of `r1mega-plan`: the r1mega-train `Config` (r1mega/config.py) plus `cluster` (the
machine, r1mega/plan/cluster.py) and `plan` (what the planner assumes and prints)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from r1mega.config import Config
from r1mega.plan.cluster import ClusterConfig


@dataclass
class PlanSettings:
    search: bool = False  # also rank the layouts that fit (`r1mega-plan --search` sets it)
    prompt_tokens: int = 1024  # the longest prompt (the planner reads no data)
    # Mean response length as a share of the longest max_new_tokens, for the times (memory always
    # takes the longest).
    response_fraction: float = 1.0
    vocab_size: int = 0  # 0: the preset's or checkpoint's (the tiny default trains with its tokenizer's 512)
    expert_imbalance: float = 1.0  # the busiest expert rank's rows over the mean
    top: int = 10  # layouts shown by the search
    json: str = ""  # also write the plan as JSON here


@dataclass
class PlanConfig(Config):
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    plan: PlanSettings = field(default_factory=PlanSettings)


def register_plan_configs() -> None:
    ConfigStore.instance().store(name="r1mega_plan_schema", node=PlanConfig)
