"""Optuna baselines: ``grid`` over a declared static design, ``random`` and ``tpe`` over schedules.

One trial = load the root state (never re-train it) and train a schedule stage by stage; its value
is the best dev score on its path, and each stage's hyperparameters are suggested when that stage
is trained, so a trial's parameters are exactly the stages it trained.

``grid`` runs a one-factor-at-a-time design around the task defaults (``Grid``), one full episode
per point, as many points as full episodes fit in the budget; the remainder (budget mod episode
stages) is left unspent, as ``Grid.unspent_reason`` says. ``random`` and ``tpe`` share everything
but the sampler: both stop unpromising trials with Optuna's ``SuccessiveHalvingPruner`` on the
per-stage running best dev score, so that at least ``min_trials`` trials fit the budget where it
can pay one stage for each (``ScheduleSearch``), and both spend the whole budget (the last trial is
cut when the budget ends, and told to Optuna as pruned).

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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import gymnasium as gym
import optuna
from optuna.pruners import BasePruner, NopPruner, SuccessiveHalvingPruner
from optuna.samplers import BaseSampler, RandomSampler, TPESampler
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import BaseTrial, Trial, TrialState

from controllers.base import (
    RunResult,
    Tracker,
    check_int,
    counters,
    default_hparams,
    episode_stages,
    run_schedule,
)

# Trials that hold a place in the pruning floor: those finished, cut short, or under way.
_STARTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)


@dataclass
class OptunaSearch:
    """Trials are schedules trained from the root; subclasses pick the sampler and the space."""

    name: str = "optuna"
    storage: str | None = None      # journal file path; None keeps the study in memory
    study_name: str | None = None   # default "<name>-seed<seed>"
    stages: int | None = None       # stages per trial; None -> the env's episode length

    def __post_init__(self) -> None:
        check_int("stages", self.stages, 1, optional=True)
        for name in ("storage", "study_name"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a string or None, got {getattr(self, name)!r}")

    def sampler(self, space: Any, seed: int) -> BaseSampler:
        raise NotImplementedError

    def pruner(self) -> BasePruner:
        return NopPruner()

    def suggest(self, trial: BaseTrial, space: Any, stage: int) -> dict[str, Any]:
        """The hyperparameters of the trial's stage ``stage`` (0-based), asked when it trains."""
        raise NotImplementedError

    def prepare(self, study: optuna.Study, space: Any, budget: int, n_stages: int) -> None:
        """Called once before the first trial of this process (the grid enqueues its design)."""

    def exhausted(self, study: optuna.Study) -> bool:
        return False

    def first_stages(self, n_stages: int) -> int:
        """Stages a trial must be able to pay before it starts."""
        return n_stages

    def floor(self, budget: int, started: int) -> int:
        """Stages kept for the trials still to start, once ``started`` have (see ScheduleSearch)."""
        return 0

    def report(self, trial: Trial, stage: int, best: float) -> None:
        """Tell Optuna the running best dev score after the trial's stage ``stage`` (0-based)."""

    def cut(self, trial: Trial) -> bool:
        """Stop the trial after the stage just reported?"""
        return False

    def run(self, env: gym.Env, budget: int, seed: int = 0) -> RunResult:
        tracker = Tracker(env, budget, seed)
        n_stages = self.stages or episode_stages(env)
        name = self.study_name or f"{self.name}-seed{seed}"
        storage = None if self.storage is None else JournalStorage(JournalFileBackend(self.storage))
        study = optuna.create_study(storage=storage, sampler=self.sampler(tracker.space, seed),
                                    pruner=self.pruner(), study_name=name, direction="maximize",
                                    load_if_exists=True)
        replay = _resume(study, tracker)       # (dev, schedule prefix) of an earlier best state
        self.prepare(study, tracker.space, budget, n_stages)

        def spare() -> int:
            reserve = len(replay[1]) if replay and replay[0] > tracker.best_dev else 0
            return tracker.remaining - reserve

        while spare() >= self.first_stages(n_stages) and not self.exhausted(study):
            trial = study.ask()
            keep = self.floor(budget, len(study.get_trials(deepcopy=False, states=_STARTED)))
            devs, finished = self.run_trial(tracker, trial, n_stages, spare, keep)
            if finished:
                _tell(study, trial.number, max(devs))
            else:   # cut by the pruner, the budget floor or the budget's end
                _tell(study, trial.number, state=TrialState.PRUNED)
            tracker.trials.append(_record(study.trials[trial.number]))
        if replay and replay[0] > tracker.best_dev and tracker.remaining >= len(replay[1]):
            devs = run_schedule(tracker, replay[1])
            tracker.trials.append({"replay": True, "schedule": replay[1], "dev_scores": devs,
                                   "stages": len(devs)})
        return tracker.result(self.name)

    def run_trial(self, tracker: Tracker, trial: Trial, n_stages: int, spare: Callable[[], int],
                  keep: int) -> tuple[list[float], bool]:
        """Train the trial's schedule from the root while more than ``keep`` of the ``spare()``
        stages are left (its first stage always); return its per-stage dev scores and whether it
        ran to its end (the episode's, or a divergence).

        Attributes are written after every stage, so the stages of a trial killed mid-way are
        still paid and its schedule can be enqueued again.
        """
        tracker.load(tracker.root)
        start = counters(tracker.env)
        schedule: list[dict[str, Any]] = []
        devs: list[float] = []
        for stage in range(n_stages):
            if devs and (spare() - keep < 1 or self.cut(trial)):
                return devs, False
            if tracker.remaining < 1:   # the env's own budget (tokens) ended the run
                return devs, False
            schedule.append(self.suggest(trial, tracker.space, stage))
            dev, done = tracker.step(schedule)
            devs.append(dev)
            now = counters(tracker.env)
            trial.set_user_attr("schedule", schedule)
            trial.set_user_attr("dev_scores", devs)
            trial.set_user_attr("cost", {k: now[k] - start[k] for k in now})
            self.report(trial, stage, max(devs))
            if done:
                break
        return devs, True


@dataclass
class Grid(OptunaSearch):
    """A one-factor-at-a-time design around the task defaults, each point a static schedule.

    The design, in order: the default configuration first; then, for each controlled name in
    ``order`` (names the env controls that ``order`` lacks follow, in the env's order), that name
    one grid step down, then one step up, the others at their defaults (a step past the grid's end
    is skipped). Each point trains one full episode with the same values every stage, and the
    first ``budget // episode stages`` points run: at 8-stage episodes a budget of 32 runs the
    default, learning rate down and up, and fewer generations. ``order`` puts first the names the
    sensitivity benchmark (README) found to move the dev score most. The design always includes the
    default, and it is the same for every seed, so the grid is the reference other rows are paired
    against.
    """

    name: str = "grid"
    order: tuple[str, ...] = ("learning_rate", "num_generations", "temperature", "beta",
                              "max_completion_length", "difficulty")
    unspent_reason: ClassVar[str | None] = (
        "a design point is a full episode: the budget's remainder after whole episodes (budget "
        "mod episode stages), or after the whole design, pays for no point")

    def design(self, space: Any) -> list[dict[str, Any]]:
        """The design's points (full hyperparameter dicts), in the order they run."""
        default = default_hparams(space)
        names = [n for n in self.order if n in space.names]
        names += [n for n in space.names if n not in names]
        points = [default]
        for name in names:
            moved = (space.neighbour(name, default[name], d, clamp=False) for d in (-1, 1))
            points += [{**default, name: v} for v in moved if v is not None]
        return points

    def fits(self, budget: int, stages: int) -> str | None:
        points = budget // stages
        if points >= 3:
            return None
        return (f"at budget {budget} with {stages}-stage episodes {points} design point(s) fit, "
                "and a one-factor-at-a-time design needs 3 (the default and one factor moved "
                "both ways)")

    def sampler(self, space: Any, seed: int) -> BaseSampler:
        return RandomSampler(seed=seed)   # never asked: every trial is an enqueued design point

    def prepare(self, study: optuna.Study, space: Any, budget: int, n_stages: int) -> None:
        # Points of this budget that no earlier process ran or enqueued (a resumed study).
        have = [t.params or t.system_attrs.get("fixed_params", {})   # a waiting one: enqueued
                for t in study.get_trials(deepcopy=False) if t.state != TrialState.FAIL]
        for point in self.design(space)[: budget // n_stages]:
            if point not in have:
                study.enqueue_trial(point)

    def suggest(self, trial: BaseTrial, space: Any, stage: int) -> dict[str, Any]:
        # The same name and choices every stage: Optuna returns the trial's value again.
        return {p: trial.suggest_categorical(p, list(space.grids[p])) for p in space.names}

    def exhausted(self, study: optuna.Study) -> bool:
        return not study.get_trials(deepcopy=False, states=(TrialState.WAITING,))


@dataclass
class ScheduleSearch(OptunaSearch):
    """Searches per-stage schedules: every controlled hyperparameter at every stage is a param.

    Trials are stopped early by successive halving (``SuccessiveHalvingPruner``: rungs at 1, 3,
    9, ... stages, reduction factor ``reduction_factor``, on the running best dev score; the first
    ``reduction_factor - 1`` trials stop at the first rung), so most cost one stage and those that
    beat the others go on to the episode's end. Where the budget pays one stage for
    each of ``min_trials`` trials, a trial also stops once going on would leave less than that
    (the budget floor), so at least ``min_trials`` trials run. A trial starts whenever one stage
    fits; the budget's end cuts the last one.
    """

    min_trials: int = 10
    reduction_factor: int | None = 3   # None: no pruning (every trial runs to its end)

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("min_trials", self.min_trials, 1)
        check_int("reduction_factor", self.reduction_factor, 2, optional=True)

    def pruner(self) -> BasePruner:
        if self.reduction_factor is None:
            return NopPruner()
        # bootstrap_count: the first reduction_factor - 1 trials stop after one stage, so no
        # trial goes on before it has beaten others (without it the first trial always runs
        # to the end, and the random start-up of TPE took ~55% of a 32-stage budget).
        return SuccessiveHalvingPruner(min_resource=1, reduction_factor=self.reduction_factor,
                                       bootstrap_count=self.reduction_factor - 1)

    def first_stages(self, n_stages: int) -> int:
        return 1

    def floor(self, budget: int, started: int) -> int:
        # One stage for each trial still to start, where the budget can pay them all.
        return max(0, self.min_trials - started) if budget >= self.min_trials else 0

    def report(self, trial: Trial, stage: int, best: float) -> None:
        trial.report(best, step=stage + 1)   # step = stages trained, the pruner's resource

    def cut(self, trial: Trial) -> bool:
        return trial.should_prune()

    def suggest(self, trial: BaseTrial, space: Any, stage: int) -> dict[str, Any]:
        hp = {}
        for p in space.names:
            grid = list(space.grids[p])
            if all(isinstance(v, int | float) for v in grid):
                # Grid indices as ints, so TPE can use their order (lr 1e-5 < 3e-5 < ...).
                hp[p] = grid[trial.suggest_int(f"s{stage}.{p}", 0, len(grid) - 1)]
            else:
                hp[p] = trial.suggest_categorical(f"s{stage}.{p}", grid)
        return hp


@dataclass
class Random(ScheduleSearch):
    """RandomSampler over per-stage schedules, pruned as ``tpe`` is (they differ in the sampler)."""

    name: str = "random"

    def sampler(self, space: Any, seed: int) -> BaseSampler:
        return RandomSampler(seed=seed)


@dataclass
class TPE(ScheduleSearch):
    """TPESampler over per-stage schedules; the first ``n_startup_trials`` are random.

    ``fits`` says where fewer than ``min_trials`` trials are sure to run, i.e. where TPE may not
    get past its random start-up by much.
    """

    name: str = "tpe"
    n_startup_trials: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("n_startup_trials", self.n_startup_trials, 0)

    def sampler(self, space: Any, seed: int) -> BaseSampler:
        return TPESampler(seed=seed, n_startup_trials=self.n_startup_trials)

    def fits(self, budget: int, stages: int) -> str | None:
        if self.n_startup_trials >= self.min_trials:
            return (f"n_startup_trials={self.n_startup_trials} is not below min_trials="
                    f"{self.min_trials}: every trial sure to run is a random start-up trial")
        if budget >= self.min_trials:
            return None
        return (f"at budget {budget} at most {budget} trials of one stage fit, fewer than the "
                f"{self.min_trials} that take TPE well past its {self.n_startup_trials} random "
                "start-up trials")


def _tell(study: optuna.Study, number: int, value: float | None = None,
          state: TrialState | None = None) -> None:
    study.tell(number, value, state=state)


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
        earlier = tracker.resume(_record(study.trials[t.number]), t.user_attrs.get("cost", {}))
        best = earlier or best
    return best
