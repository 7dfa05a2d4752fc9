"""The reward registry and how rewards are combined.

A reward is a plain function `fn(completion, sample) -> RewardOutput`, where `completion` is the text the
model wrote after the prompt (after "Assistant:") and `sample` is the dataset row. Rewards are registered
by name with `@register_reward("name")` and looked up with `get_reward(name)`: the scoring pool ships
names, not functions, to its workers, so a worker finds the same function by importing
`r1mega.rewards` and asking the registry.

`compose` turns the trainer's config (a dict name -> weight, or a list of (name, weight)) into a list of
`RewardSpec`s; `weighted_sum` is the scalar the trainer optimises. The R1 compositions are named here:
`RULE` (accuracy + format, equal weights) and `all_scenario(...)` (reasoning + general + language).

Deliberately left out: import-by-string plugins (a new reward is a new module imported by
`r1mega/rewards/__init__.py`) and any normalisation of rewards (the group advantage does that).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence, Union


@dataclass(frozen=True)
class RewardOutput:
    """One reward's verdict on one completion: the score and, when it is not full marks, why."""

    score: float
    reason: str | None = None


class RewardFn(Protocol):
    def __call__(self, completion: str, sample: Mapping[str, Any]) -> RewardOutput: ...


_REGISTRY: dict[str, RewardFn] = {}
_RUNS_CODE: set[str] = set()


def register_reward(name: str, *, runs_code: bool = False) -> Callable[[RewardFn], RewardFn]:
    """Decorator registering `fn` under `name`; a second, different function under a taken name fails.
    `runs_code`: the reward executes model-written programs (in the sandbox), so a pool using it checks
    the sandbox's isolation before any scoring."""

    def decorate(fn: RewardFn) -> RewardFn:
        if name in _REGISTRY and _REGISTRY[name] is not fn:
            raise ValueError(f"reward {name!r} is already registered (by {_REGISTRY[name]!r})")
        _REGISTRY[name] = fn
        if runs_code:
            _RUNS_CODE.add(name)
        return fn

    return decorate


def runs_code(name: str) -> bool:
    return name in _RUNS_CODE


def get_reward(name: str) -> RewardFn:
    if name not in _REGISTRY:
        raise KeyError(f"unknown reward {name!r}: registered rewards are {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def registered_rewards() -> list[str]:
    return sorted(_REGISTRY)


@dataclass(frozen=True)
class RewardSpec:
    name: str
    weight: float = 1.0


ComponentsLike = Union[Mapping[str, float], Iterable[Union[RewardSpec, Sequence[Any]]]]


def compose(components: ComponentsLike) -> list[RewardSpec]:
    """Normalise a config's reward components into `RewardSpec`s, checking every name is registered.

    Accepts a dict name -> weight, or an iterable of `RewardSpec` or (name, weight) pairs. A name given
    twice is an error (its weights would silently add up otherwise).
    """
    items = components.items() if isinstance(components, Mapping) else components
    specs = [c if isinstance(c, RewardSpec) else RewardSpec(str(c[0]), float(c[1])) for c in items]
    names = [s.name for s in specs]
    if not specs:
        raise ValueError("no reward components configured (pick a conf/reward preset or set reward.components)")
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"reward components named more than once: {duplicated}")
    for spec in specs:
        get_reward(spec.name)  # fails with the list of known names
    return specs


def weighted_sum(specs: Sequence[RewardSpec], scores: Mapping[str, float]) -> float:
    return sum(spec.weight * scores[spec.name] for spec in specs)


# R1: Reward_rule = Reward_acc + Reward_format, equal weights (R1-Zero template format).
RULE: dict[str, float] = {"math_accuracy": 1.0, "format_r1_zero": 1.0}


def all_scenario(reasoning: Mapping[str, float] | None = None, reward_model: str = "helpful_rm",
                 format_reward: str = "format_r1", language: str = "language_consistency",
                 language_weight: float = 1.0) -> dict[str, float]:
    """R1 stage 4: Reward = Reward_reasoning + Reward_general + Reward_language, with
    Reward_general = Reward_reward_model + Reward_format.

    Stage 4 mixes reasoning rows (graded by rules) and general rows (graded by reward models). Each
    reward scores 0 on rows it does not apply to: the rule rewards need "answer" (or "tests"), and the
    reward models score only rows that have neither, so one sum serves both kinds of row.
    """
    reasoning = dict(reasoning or {"math_accuracy": 1.0})
    out = {**reasoning, reward_model: 1.0, format_reward: 1.0, language: language_weight}
    if len(out) != len(reasoning) + 3:
        raise ValueError(f"reasoning rewards {sorted(reasoning)} overlap the general/language ones")
    return out
