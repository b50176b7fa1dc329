"""Open-loop baselines: task defaults every stage, and the progressive response-length recipe."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import gymnasium as gym
import numpy as np

from controllers.base import (
    RunResult,
    Tracker,
    default_hparams,
    episode_stages,
    run_schedule,
)


@dataclass
class Fixed:
    """The task's default hyperparameters (plus ``overrides``) for every stage of one episode."""

    name: str = "fixed"
    overrides: dict[str, Any] = field(default_factory=dict)

    def schedule(self, space: Any, stages: int) -> list[dict[str, Any]]:
        hp = {**default_hparams(space), **self.overrides}
        return [dict(hp) for _ in range(stages)]

    def run(self, env: gym.Env, budget: int, seed: int = 0) -> RunResult:
        tracker = Tracker(env, budget, seed)
        # One episode; a deterministic schedule gains nothing from being trained twice.
        schedule = self.schedule(tracker.space, min(episode_stages(env), budget))
        devs = run_schedule(tracker, schedule)
        tracker.trials.append({"number": 0, "schedule": schedule[: len(devs)], "dev_scores": devs})
        return tracker.result(self.name)


@dataclass
class Progressive(Fixed):
    """Response length grows stage by stage from the grid's shortest to its longest value.

    Everything else stays at the task defaults: the field's dominant recipe (short responses
    while the model is weak and cheap to sample, longer ones once it has learned the format).
    """

    name: str = "progressive"
    param: str = "max_completion_length"

    def schedule(self, space: Any, stages: int) -> list[dict[str, Any]]:
        if self.param not in space.names:
            raise ValueError(f"progressive needs {self.param!r} in the action space {space.names}")
        grid = list(space.grids[self.param])
        # Evenly spread grid indices, non-decreasing, first stage shortest, last stage longest.
        idx = np.rint(np.linspace(0, len(grid) - 1, max(stages, 1))).astype(int)[:stages]
        base = super().schedule(space, stages)
        return [dict(hp, **{self.param: grid[i]}) for hp, i in zip(base, idx, strict=True)]
