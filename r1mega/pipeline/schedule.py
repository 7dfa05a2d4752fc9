"""Stage 4's prompt schedule: reasoning prompts first, general prompts joining for the last steps.

The paper's second RL stage runs 1,700 steps and brings in general instruction data and the preference
reward model "exclusively in the final 400 steps" (more steps with the model-based reward led to reward
hacking). `SwitchedPrompts` is the trainer's prompt stream for that: rows from one stream while the
trainer's step is before `switch`, from the other from then on. The reward model needs no switch of
its own: it scores general rows only (reward_model.py: a row with an "answer" gets 0 without running
it), so before the switch it never runs.

Deliberately left out: a gradual ramp of the general share (the paper switches at one step).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

from r1mega.trainers.prompts import PromptStream

# The paper's second RL stage: general data and the reward model in the final 400 of 1,700 steps.
PAPER_GENERAL_STEPS, PAPER_STAGE_STEPS = 400, 1700


def general_steps(steps: int, configured: int | None) -> int:
    """The final steps with general data: `configured`, or the paper's share of `steps` when None."""
    if configured is None:
        return round(steps * PAPER_GENERAL_STEPS / PAPER_STAGE_STEPS)
    if not 0 <= configured <= steps:
        raise ValueError(f"pipeline.all_scenario_rl.general_steps={configured} must be in [0, "
                         f"pipeline.all_scenario_rl.steps={steps}]")
    return configured


class SwitchedPrompts:
    """`before`'s rows while the followed step is below `switch`, `after`'s from then on; each a seeded,
    resumable `PromptStream`. The trainer takes a rollout's prompts at the rollout's first step, so a
    rollout joins `after` when it starts at or past `switch`."""

    def __init__(self, before: Sequence[Mapping[str, Any]], after: Sequence[Mapping[str, Any]], switch: int,
                 seed: int):
        self.streams = {"before": PromptStream(before, seed), "after": PromptStream(after, seed)}
        self.switch = switch
        self.rows = [*before, *after]  # every row that can reach the engine, for its sizing
        self.step: Callable[[], int] = lambda: 0

    def follow(self, step: Callable[[], int]) -> None:
        """Reads the step from `step()` (the trainer's steps done) from now on."""
        self.step = step

    def take(self, count: int) -> list[Mapping[str, Any]]:
        return self.streams["after" if self.step() >= self.switch else "before"].take(count)

    def state_dict(self) -> dict[str, dict[str, int]]:
        return {name: stream.state_dict() for name, stream in self.streams.items()}

    def load_state_dict(self, state: Mapping[str, Mapping[str, int]]) -> None:
        for name, stream in self.streams.items():
            stream.load_state_dict(state[name])
