"""Optuna baselines: ``grid`` over static configurations, ``random`` and ``tpe`` over schedules.

One trial = load the root state (never re-train it) and train a schedule of ``stages`` stages; its
value is the best dev score on its path. Trials run only while a *full* trial fits in the
remaining budget, so every trial is comparable and Optuna never learns from a truncated one; the
remainder (budget mod stages) is left unspent and the RunResult's cost says so.

Studies are ask-and-tell over any Optuna storage; ``storage="path.journal"`` uses a
JournalFileBackend, so an interrupted search resumes: finished trials are not re-run and their
stages count against the budget (the budget is the whole study's), and a trial killed mid-way
(left RUNNING) is marked FAIL, its paid stages counted, and its parameters enqueued to run first.
Env states cannot be pickled, so when the best state belongs to an earlier process it is rebuilt
at the end by replaying that trial's schedule up to its best stage from the root (deterministic
on CPU); those stages are reserved from the budget while that trial is the best. One worker per
study.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import optuna
from optuna.samplers import BaseSampler, GridSampler, RandomSampler, TPESampler
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import BaseTrial, TrialState

from controllers.base import (
    RunResult,
    Tracker,
    counters,
    default_hparams,
    episode_stages,
    run_schedule,
)


@dataclass
class OptunaSearch:
    """Trials are schedules trained from the root; subclasses pick the sampler and the space."""

    name: str = "optuna"
    storage: str | None = None      # journal file path; None keeps the study in memory
    study_name: str | None = None   # default "<name>-seed<seed>"
    stages: int | None = None       # stages per trial; None -> the env's episode length

    def sampler(self, space: Any, seed: int) -> BaseSampler:
        raise NotImplementedError

    def suggest(self, trial: BaseTrial, space: Any, stages: int) -> list[dict[str, Any]]:
        """The trial's schedule: one hyperparameter dict per stage."""
        raise NotImplementedError

    def exhausted(self, study: optuna.Study) -> bool:
        return False

    def run(self, env: gym.Env, budget: int, seed: int = 0) -> RunResult:
        tracker = Tracker(env, budget, seed)
        n_stages = self.stages or episode_stages(env)
        name = self.study_name or f"{self.name}-seed{seed}"
        storage = None if self.storage is None else JournalStorage(JournalFileBackend(self.storage))
        study = optuna.create_study(storage=storage, sampler=self.sampler(tracker.space, seed),
                                    study_name=name, direction="maximize", load_if_exists=True)
        replay = _resume(study, tracker)       # (dev, schedule prefix) of an earlier best state

        def reserve() -> int:
            return len(replay[1]) if replay and replay[0] > tracker.best_dev else 0

        while tracker.remaining - reserve() >= n_stages and not self.exhausted(study):
            trial = study.ask()
            schedule = self.suggest(trial, tracker.space, n_stages)
            trial.set_user_attr("schedule", schedule)
            start = counters(env)

            def progress(i: int, dev: float, trial=trial, start=start) -> None:
                # Written after every stage, so stages of a trial killed mid-way are still paid.
                now = counters(env)
                trial.set_user_attr("cost", {k: now[k] - start[k] for k in now})

            devs = run_schedule(tracker, schedule, on_stage=progress)
            trial.set_user_attr("dev_scores", devs)
            _tell(study, trial.number, max(devs))
            tracker.trials.append(_record(study.trials[trial.number]))
        if reserve() and tracker.remaining >= reserve():
            devs = run_schedule(tracker, replay[1])
            tracker.trials.append({"replay": True, "schedule": replay[1], "dev_scores": devs,
                                   "stages": len(devs)})
        return tracker.result(self.name)


@dataclass
class Grid(OptunaSearch):
    """GridSampler over static configurations (the same values every stage) on a coarse grid.

    Each of ``params`` takes ``values`` evenly spread grid values plus the task default; the other
    hyperparameters stay at their defaults. The search stops early once the grid is exhausted.
    """

    name: str = "grid"
    params: tuple[str, ...] = ("learning_rate", "beta", "temperature")
    values: int = 3

    def coarse(self, space: Any) -> dict[str, list[Any]]:
        defaults, out = default_hparams(space), {}
        for p in self.params:
            if p not in space.names:
                continue
            grid = list(space.grids[p])
            idx = set(np.rint(np.linspace(0, len(grid) - 1, self.values)).astype(int).tolist())
            idx.add(space.index(p, defaults[p]))
            out[p] = [grid[i] for i in sorted(idx)]
        return out

    def sampler(self, space: Any, seed: int) -> BaseSampler:
        return GridSampler(self.coarse(space), seed=seed)

    def suggest(self, trial: BaseTrial, space: Any, stages: int) -> list[dict[str, Any]]:
        hp = default_hparams(space)
        for p in self.coarse(space):
            hp[p] = trial.suggest_categorical(p, list(space.grids[p]))
        return [dict(hp) for _ in range(stages)]

    def exhausted(self, study: optuna.Study) -> bool:
        # A re-enqueued (WAITING) trial still has to run even when every grid point is visited.
        waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
        return study.sampler.is_exhausted(study) and not waiting


@dataclass
class ScheduleSearch(OptunaSearch):
    """Searches per-stage schedules: every controlled hyperparameter at every stage is a param."""

    def suggest(self, trial: BaseTrial, space: Any, stages: int) -> list[dict[str, Any]]:
        schedule = []
        for s in range(stages):
            hp = {}
            for p in space.names:
                grid = list(space.grids[p])
                if all(isinstance(v, int | float) for v in grid):
                    # Grid indices as ints, so TPE can use their order (lr 1e-5 < 3e-5 < ...).
                    hp[p] = grid[trial.suggest_int(f"s{s}.{p}", 0, len(grid) - 1)]
                else:
                    hp[p] = trial.suggest_categorical(f"s{s}.{p}", grid)
            schedule.append(hp)
        return schedule


@dataclass
class Random(ScheduleSearch):
    """RandomSampler over per-stage schedules."""

    name: str = "random"

    def sampler(self, space: Any, seed: int) -> BaseSampler:
        return RandomSampler(seed=seed)


@dataclass
class TPE(ScheduleSearch):
    """TPESampler over per-stage schedules; the first ``n_startup_trials`` are random."""

    name: str = "tpe"
    n_startup_trials: int = 5

    def sampler(self, space: Any, seed: int) -> BaseSampler:
        return TPESampler(seed=seed, n_startup_trials=self.n_startup_trials)


def _tell(study: optuna.Study, number: int, value: float | None = None,
          state: TrialState | None = None) -> None:
    try:
        study.tell(number, value, state=state)
    except RuntimeError as e:
        # GridSampler calls study.stop() after the last grid point, which raises outside
        # optimize(); the trial is already stored, and exhaustion is checked before each ask.
        if "Study.stop" not in str(e):
            raise


def _record(t: optuna.trial.FrozenTrial) -> dict[str, Any]:
    return {"number": t.number, "state": t.state.name, "value": t.value,
            "schedule": t.user_attrs.get("schedule", []),
            "dev_scores": t.user_attrs.get("dev_scores", []),
            "stages": int(t.user_attrs.get("cost", {}).get("stages", 0))}


def _resume(study: optuna.Study, tracker: Tracker) -> tuple[float, list[dict]] | None:
    """Count the trials of earlier processes; return the best earlier (dev, schedule prefix)."""
    best: tuple[float, list[dict]] | None = None
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.RUNNING:
            # Killed mid-trial: its training is lost with that process, so it runs again.
            _tell(study, t.number, state=TrialState.FAIL)
            study.enqueue_trial(t.params)
        if t.state == TrialState.WAITING:
            continue
        for k, v in t.user_attrs.get("cost", {}).items():
            tracker.prior[k] += v
        rec = _record(study.trials[t.number])
        rec["resumed"] = True
        tracker.trials.append(rec)
        before, curve = int(tracker.prior["stages"]) - rec["stages"], tracker.anytime[-1][1]
        for i, dev in enumerate(rec["dev_scores"]):
            if dev > curve:      # curve starts at the base dev score: strictly better states only
                best = (dev, rec["schedule"][: i + 1])
            curve = max(curve, dev)
            tracker.anytime.append((before + i + 1, curve))
        if not rec["dev_scores"] and rec["stages"]:    # a killed trial: paid for, nothing kept
            tracker.anytime.append((int(tracker.prior["stages"]), curve))
    return best
