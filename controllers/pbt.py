"""Population-based training over env states (Jaderberg et al. 2017), synchronous.

Each round every member loads its own saved state and trains one stage. Between rounds, truncation
selection: each of the bottom ``frac`` of members (by dev score) copies the state and
hyperparameters of a random member of the top ``frac`` (exploit), then moves each hyperparameter to
a neighbouring grid index with probability ``perturb_prob`` or resamples it with the small
probability ``resample_prob`` (explore). The budget is total stages: ``population * rounds``, at
most one episode of rounds, so ``budget mod population`` (and anything past ``population * episode
stages``) is left unspent, as ``PBT.unspent_reason`` says.
"""

from __future__ import annotations

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
)


@dataclass
class Member:
    """One population member: its saved env state, its next stage's hyperparameters, its path."""

    state: Any
    hparams: dict[str, Any]
    schedule: list[dict[str, Any]] = field(default_factory=list)   # stages that made `state`
    dev: float = float("-inf")
    parent: int | None = None          # who it copied at the last exploit
    dead: bool = False                 # its last stage diverged: the env cannot train it further


@dataclass
class PBT:
    """Synchronous PBT; ``population=None`` takes as many members as full episodes fit in budget."""

    name: str = "pbt"
    population: int | None = None
    frac: float = 0.25
    perturb_prob: float = 0.5
    resample_prob: float = 0.05
    unspent_reason: ClassVar[str | None] = (
        "synchronous rounds of the whole population, at most one episode of them: the budget "
        "beyond population x rounds pays for no round")

    def __post_init__(self) -> None:
        check_int("population", self.population, 1, optional=True)
        # The top and bottom `frac` of the population must not overlap.
        check_fraction("frac", self.frac, 0.0, 0.5, open_low=True)
        check_fraction("perturb_prob", self.perturb_prob)
        check_fraction("resample_prob", self.resample_prob)
        if self.perturb_prob + self.resample_prob > 1:
            raise ValueError(f"perturb_prob + resample_prob must be <= 1, got "
                             f"{self.perturb_prob} + {self.resample_prob}")

    def sizes(self, budget: int, horizon: int) -> tuple[int, int]:
        """(members, rounds) for a budget: as many members as full episodes fit, at least 2."""
        n = self.population or max(2, budget // horizon)
        n = max(1, min(n, budget))                 # at least one round whenever budget >= 1
        return n, min(horizon, budget // n)

    def fits(self, budget: int, stages: int) -> str | None:
        n, rounds = self.sizes(budget, stages)
        if rounds >= stages:
            return None
        return (f"at budget {budget} the {n} members train {rounds} of the episode's {stages} "
                "stages: the population never reaches the episode's end")

    def run(self, env: gym.Env, budget: int, seed: int = 0) -> RunResult:
        tracker = Tracker(env, budget, seed)
        space, rng = tracker.space, np.random.default_rng(seed)
        horizon = episode_stages(env)
        n, rounds = self.sizes(budget, horizon)
        # Member 0 starts from the task defaults, the others from random grid points.
        members = [Member(tracker.root, default_hparams(space))]
        members += [Member(tracker.root, _sample(space, rng)) for _ in range(n - 1)]

        for r in range(rounds):
            for i, m in enumerate(members):
                if m.dead:                     # only when every member has diverged
                    continue
                if tracker.remaining < 1:      # the env's token budget ended the run
                    break
                tracker.load(m.state)
                path = m.schedule + [dict(m.hparams)]
                m.dev, done = tracker.step(path)
                m.state, m.schedule = env.unwrapped.save_state(), path
                m.dead = done and r < horizon - 1      # truncated before the episode's end
                tracker.trials.append({"round": r, "member": i, "hparams": dict(m.hparams),
                                       "dev": m.dev, "parent": m.parent})
            if r < rounds - 1:
                exploit(members, self.frac, rng)
                for m in members:
                    if m.parent is not None:
                        m.hparams = explore(m.hparams, space, rng, self.perturb_prob,
                                            self.resample_prob)
        return tracker.result(self.name)


def exploit(members: list[Member], frac: float, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Truncation selection: each bottom member copies a random top member; returns (child, parent).

    Sharing the state handle is a copy: ``load_state`` restores from it and never trains it.
    """
    for m in members:
        m.parent = None
    k = max(1, int(len(members) * frac)) if len(members) >= 2 else 0
    # Stable sort by dev (ties keep index order), so the ranking is deterministic.
    order = sorted(range(len(members)), key=lambda i: -members[i].dev)
    top = [i for i in order if not members[i].dead][:k]
    # Diverged members are always replaced, whatever their rank.
    bottom = sorted(set(order[len(members) - k:]) | {i for i in order if members[i].dead})
    bottom = [i for i in bottom if i not in top] if top else []
    pairs = []
    for child in bottom:
        parent = top[int(rng.integers(len(top)))]
        src, dst = members[parent], members[child]
        dst.state, dst.hparams, dst.schedule = src.state, dict(src.hparams), list(src.schedule)
        dst.dev, dst.parent, dst.dead = src.dev, parent, False
        pairs.append((child, parent))
    return pairs


def explore(hparams: dict[str, Any], space: Any, rng: np.random.Generator,
            perturb_prob: float = 0.5, resample_prob: float = 0.05) -> dict[str, Any]:
    """Move each hyperparameter one grid index up or down, or rarely resample it from its grid."""
    out = dict(hparams)
    for p in space.names:
        grid, u = list(space.grids[p]), rng.random()
        if u < resample_prob:
            out[p] = grid[int(rng.integers(len(grid)))]
        elif u < resample_prob + perturb_prob:
            out[p] = space.neighbour(p, out[p], int(rng.choice((-1, 1))))
    return out


def _sample(space: Any, rng: np.random.Generator) -> dict[str, Any]:
    return {p: space.grids[p][int(rng.integers(len(space.grids[p])))] for p in space.names}
