"""Open-loop baselines: task defaults every stage, and the progressive response-length recipe."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np

from controllers.base import (
    RunResult,
    Tracker,
    check_fraction,
    check_int,
    default_hparams,
    episode_stages,
    run_schedule,
)

# Training is deterministic for a seed, so a second run of the same schedule from the root would
# retrain the very same states: an open-loop controller runs its episode once.
OPEN_LOOP = "open loop and deterministic: one episode; repeating it retrains the same states"


@dataclass
class Fixed:
    """The task's default hyperparameters (plus ``overrides``) for every stage of one episode."""

    name: str = "fixed"
    overrides: dict[str, Any] = field(default_factory=dict)
    unspent_reason: ClassVar[str | None] = OPEN_LOOP

    def __post_init__(self) -> None:
        if not isinstance(self.overrides, Mapping):
            raise ValueError(f"overrides must be a dict of hyperparameter values, got "
                             f"{self.overrides!r}")

    def schedule(self, env: gym.Env, stages: int) -> list[dict[str, Any]]:
        hp = {**default_hparams(env.unwrapped.hparams), **self.overrides}
        return [dict(hp) for _ in range(stages)]

    def run(self, env: gym.Env, budget: int, seed: int = 0) -> RunResult:
        tracker = Tracker(env, budget, seed)
        schedule = self.schedule(env, min(episode_stages(env), budget))
        devs = run_schedule(tracker, schedule)
        tracker.trials.append({"number": 0, "schedule": schedule[: len(devs)], "dev_scores": devs})
        return tracker.result(self.name)


@dataclass
class Progressive(Fixed):
    """Response length grows stage by stage, from the shortest grid length that holds the task's
    answers at its default training level up to the grid's longest.

    Everything else stays at the task defaults: the field's dominant recipe (short responses
    while the model is weak and cheap to sample, longer ones once it has learned the format). The
    start is read from data, not set per task: the shortest length that holds ``coverage`` of the
    reference completions (worked solution + end-of-sequence token, in the env's tokenizer) of
    ``sample`` training problems at the env's default difficulty, so the first stage does not cut
    the answers it is rewarded for (``start_length``).
    """

    name: str = "progressive"
    param: str = "max_completion_length"
    coverage: float = 0.95
    sample: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        check_fraction("coverage", self.coverage, open_low=True)
        check_int("sample", self.sample, 1)

    def schedule(self, env: gym.Env, stages: int) -> list[dict[str, Any]]:
        space = env.unwrapped.hparams
        if self.param not in space.names:
            raise ValueError(f"progressive needs {self.param!r} in the action space {space.names}")
        grid = list(space.grids[self.param])
        first = grid.index(self.start_length(env))
        # Evenly spread grid indices, non-decreasing, from the start up to the longest.
        idx = np.rint(np.linspace(first, len(grid) - 1, max(stages, 1))).astype(int)[:stages]
        base = super().schedule(env, stages)
        return [dict(hp, **{self.param: grid[i]}) for hp, i in zip(base, idx, strict=True)]

    def start_length(self, env: gym.Env) -> int:
        """The shortest grid length holding ``coverage`` of the default level's reference
        completions (the env must be reset: its trainer holds the tokenizer)."""
        u = env.unwrapped
        examples = u.task.examples("train", u.difficulty)[: self.sample]
        lengths = reference_lengths([e.solution for e in examples], u.trainer.tokenizer)
        return fitting_length(lengths, u.hparams.grids[self.param], self.coverage)


def reference_lengths(completions: Sequence[str], tokenizer: Any) -> list[int]:
    """Tokens of each reference completion as the policy would write it: its text, then EOS."""
    ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    return [len(x) + 1 for x in ids]


def fitting_length(lengths: Sequence[int], grid: Sequence[int], coverage: float = 0.95) -> int:
    """The shortest value of ``grid`` that holds at least ``coverage`` of ``lengths`` (the
    longest value when none does)."""
    if not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must be in (0, 1], got {coverage}")
    if not lengths:
        raise ValueError("no reference completions to measure")
    need = float(np.quantile(np.asarray(lengths), coverage, method="higher"))
    fits = [g for g in sorted(grid) if g >= need]
    return fits[0] if fits else max(grid)
