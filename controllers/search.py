"""Optuna baselines: ``grid`` over a declared static design, ``random`` and ``tpe`` over schedules.

One trial = load the root state (never re-train it) and train a schedule stage by stage; its value
is the dev score of its last state (what the selection rule, ``controllers.base.SELECT_RULE_TEXT``,
takes from a whole schedule), and each stage's hyperparameters are suggested when that stage is
trained, so a trial's parameters are exactly the stages it trained.

``grid`` runs a one-factor-at-a-time design around the task defaults (``Grid``), every controlled
name moved both ways, fit to the budget by successive halving over the design (``halving_plan``:
every point trains a first rung of stages, the best go on, the last ones to the episode's end);
what the plan leaves of the budget is unspent, as ``Grid.unspent_reason`` says. ``random`` and
``tpe`` share everything
but the sampler: both stop unpromising trials with Optuna's ``SuccessiveHalvingPruner`` on the
per-stage dev score, so that at least ``min_trials`` trials fit the budget where it
can pay one stage for each (``ScheduleSearch``), and both spend the whole budget (the last trial is
cut when the budget ends, and told to Optuna as pruned).

Studies are ask-and-tell over any Optuna storage; ``storage="path.journal"`` uses a
JournalFileBackend, so an interrupted search resumes: finished trials are not re-run and their
stages count against the budget (the budget is the whole study's), and a trial killed mid-way
(left RUNNING) is marked FAIL, its paid stages counted, and its parameters run again (random and
tpe: first). Env states cannot be pickled, so when the state the selection rule chooses belongs to
an earlier process it is rebuilt at the end by replaying its schedule from the root (``rebuild``,
deterministic on CPU); those stages are reserved from the budget while it is the chosen one. One
worker per study.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
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

    def first_stages(self, n_stages: int) -> int:
        """Stages a trial must be able to pay before it starts."""
        return n_stages

    def floor(self, budget: int, started: int) -> int:
        """Stages kept for the trials still to start, once ``started`` have (see ScheduleSearch)."""
        return 0

    def report(self, trial: Trial, stage: int, dev: float) -> None:
        """Tell Optuna the dev score after the trial's stage ``stage`` (0-based)."""

    def cut(self, trial: Trial) -> bool:
        """Stop the trial after the stage just reported?"""
        return False

    def study(self, space: Any, seed: int) -> optuna.Study:
        """The run's study: in memory, or loaded from (or made in) ``storage``."""
        name = self.study_name or f"{self.name}-seed{seed}"
        storage = None if self.storage is None else JournalStorage(JournalFileBackend(self.storage))
        return optuna.create_study(storage=storage, sampler=self.sampler(space, seed),
                                   pruner=self.pruner(), study_name=name, direction="maximize",
                                   load_if_exists=True)

    def run(self, env: gym.Env, budget: int, seed: int = 0) -> RunResult:
        tracker = Tracker(env, budget, seed)
        n_stages = self.stages or episode_stages(env)
        study = self.study(tracker.space, seed)
        _resume(study, tracker, requeue=True)

        def spare() -> int:   # stages kept to rebuild a chosen state an earlier process trained
            return tracker.remaining - len(tracker.lost or [])

        while spare() >= self.first_stages(n_stages):
            trial = study.ask()
            keep = self.floor(budget, len(study.get_trials(deepcopy=False, states=_STARTED)))
            devs, finished = self.run_trial(tracker, trial, n_stages, spare, keep)
            if finished:
                _tell(study, trial.number, devs[-1])
            else:   # cut by the pruner, the budget floor or the budget's end
                _tell(study, trial.number, state=TrialState.PRUNED)
            tracker.trials.append(_record(study.trials[trial.number]))
        rebuild(tracker)
        return tracker.result(self.name)

    def run_trial(self, tracker: Tracker, trial: Trial, n_stages: int, spare: Callable[[], int],
                  keep: int) -> tuple[list[float], bool]:
        """Train the trial's schedule from the root while more than ``keep`` of the ``spare()``
        stages are left (its first stage always); return its per-stage dev scores and whether it
        ran to its end (the episode's, or a divergence)."""
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
            _write_trial(trial, tracker, schedule, devs, {k: now[k] - start[k] for k in now})
            self.report(trial, stage, dev)
            if done:
                break
        return devs, True


@dataclass
class Grid(OptunaSearch):
    """A one-factor-at-a-time design around the task defaults, each point a static schedule, fit
    to the budget by successive halving.

    The design, in order: the default configuration first; then, for each controlled name in
    ``order`` (names the env controls that ``order`` lacks follow, in the env's order), that name
    one grid step down, then one step up, the others at their defaults (a step past the grid's end
    is skipped). So every controlled name moves both ways where its grid allows, capacity
    (``num_generations``, ``max_completion_length``) included, and the design is the same for
    every seed: the grid is the reference other rows are paired against. ``order`` puts first the
    names the sensitivity benchmark (README) found to move the dev score most.

    Successive halving (``halving_plan``) fits the design to the budget: every point trains the
    first rung of stages from the root; at each rung the best ``1 / reduction_factor`` of the
    points still training (by dev score there; ties: design order) go on to the next rung,
    ``reduction_factor`` times as many stages, the last one the episode's end; the others stop
    there. A point whose episode ends early (its token cap, a divergence) stops where it ended.
    The first rung is the longest with which the plan fits. ``fits`` says where one stage for
    every point and one point taken on to the episode's end do not fit; the design's first points
    then run. A resumed study (``storage``) runs the points no earlier process finished.
    """

    name: str = "grid"
    order: tuple[str, ...] = ("learning_rate", "num_generations", "temperature", "beta",
                              "max_completion_length", "difficulty")
    reduction_factor: int = 3
    unspent_reason: ClassVar[str | None] = (
        "successive halving over a fixed design: the budget beyond the plan's rungs pays for no "
        "rung")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int("reduction_factor", self.reduction_factor, 2)

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

    def fits(self, budget: int, stages: int, space: Any = None) -> str | None:
        """None where the plan trains every design point and takes one to the episode's end.
        Without the env's ``space`` the design is taken at its largest: every name of ``order``
        moved both ways."""
        points = len(self.design(space)) if space is not None else 1 + 2 * len(self.order)
        plan = halving_plan(points, stages, budget, self.reduction_factor)
        if plan and plan[0][1] == points and plan[-1][0] == stages:
            return None
        return (f"at budget {budget} with {stages}-stage episodes the {points}-point design does "
                f"not fit successive halving: one stage for every point and one point taken on "
                f"to the episode's end need {points + stages - 1} stages")

    def sampler(self, space: Any, seed: int) -> BaseSampler:
        return RandomSampler(seed=seed)   # never asked: every trial is a design point

    def run(self, env: gym.Env, budget: int, seed: int = 0) -> RunResult:
        tracker = Tracker(env, budget, seed)
        n_stages = self.stages or episode_stages(env)
        study = self.study(tracker.space, seed)
        finished = _resume(study, tracker, requeue=False)
        design = self.design(tracker.space)
        todo = [i for i, p in enumerate(design) if p not in finished]
        # Stages kept to rebuild a chosen state an earlier process trained (``rebuild``).
        spare = tracker.remaining - len(tracker.lost or [])
        plan = halving_plan(len(todo), n_stages, spare, self.reduction_factor)
        points = [_Point(i, design[i], tracker.root) for i in todo[: plan[0][1]]] if plan else []
        going = points
        for k, (rung, n) in enumerate(plan):
            if k:   # the best n of the points still training go on; the others stop here
                going = sorted((p for p in points if p.open), key=lambda p: (-p.devs[-1], p.index))
                for p in going[n:]:
                    p.close(study, TrialState.PRUNED)
                going = going[:n]
            if not all(self.train(study, tracker, p, rung) for p in going):
                break   # the budget ended
        for p in (p for p in points if p.open):
            p.close(study, TrialState.PRUNED)   # cut by the budget's end, or never started
        tracker.trials += [p.record(study) for p in points if p.trial is not None]
        rebuild(tracker)
        return tracker.result(self.name)

    def train(self, study: optuna.Study, tracker: Tracker, point: _Point, rung: int) -> bool:
        """Train ``point`` on from its state up to ``rung`` stages (or its episode's end); False
        when the budget ended first."""
        if point.trial is None:
            point.trial = _ask_point(study, point.hparams, tracker.space)
        tracker.load(point.state)
        start = counters(tracker.env)
        while len(point.devs) < rung and point.open:
            if tracker.remaining < 1:
                return False
            dev, done = tracker.step([point.hparams] * (len(point.devs) + 1))
            point.devs.append(dev)
            now = counters(tracker.env)
            point.cost = {k: point.cost.get(k, 0.0) + now[k] - start[k] for k in now}
            start = now
            _write_trial(point.trial, tracker, [point.hparams] * len(point.devs), point.devs,
                         point.cost)
            if done:
                point.close(study, TrialState.COMPLETE)
        if point.open:
            point.state = tracker.env.unwrapped.save_state()
            point.trial.report(point.devs[-1], step=len(point.devs))
        return True


@dataclass(eq=False)
class _Point:
    """One design point under successive halving: its trial, state and dev scores so far."""

    index: int
    hparams: dict[str, Any]
    state: Any
    devs: list[float] = field(default_factory=list)
    trial: Trial | None = None
    cost: dict[str, float] = field(default_factory=dict)
    told: bool = False         # its trial is over: its episode ended, or halving stopped it

    @property
    def open(self) -> bool:
        return not self.told

    def close(self, study: optuna.Study, state: TrialState) -> None:
        if self.trial is not None:
            _tell(study, self.trial.number, self.devs[-1] if state == TrialState.COMPLETE
                  else None, state=None if state == TrialState.COMPLETE else state)
        self.told = True

    def record(self, study: optuna.Study) -> dict[str, Any]:
        """What ``RunResult.trials`` keeps: the point, how far it went and why it stopped."""
        return {**_record(study.trials[self.trial.number]), "point": self.index,
                "hparams": self.hparams}


def _ask_point(study: optuna.Study, point: dict[str, Any], space: Any) -> Trial:
    """A new trial whose params are ``point`` (enqueued, then asked); a point an older process
    left waiting that comes out first is marked FAIL (its point runs when its turn comes)."""
    study.enqueue_trial(point)
    while True:
        trial = study.ask()
        if {p: trial.suggest_categorical(p, list(space.grids[p])) for p in space.names} == point:
            return trial
        _tell(study, trial.number, state=TrialState.FAIL)


def halving_plan(points: int, stages: int, budget: int, eta: int) -> list[tuple[int, int]]:
    """Successive halving of ``points`` static schedules of ``stages``-stage episodes within
    ``budget`` stages: [(rung, schedules trained to it), ...], rungs ascending, the last the
    episode's end; it costs ``plan_cost``.

    Every rung trains the best 1/eta of the last rung's schedules (rounded up), eta times as far
    (at most to the episode's end). The first rung is the longest that fits, and what the plan
    leaves of the budget takes more schedules to the end. Where even a first rung of one stage
    does not fit, every point trains one stage and as many as fit go on to the end (at least
    one); where that does not fit either, the design's first points do, and the run goes as far
    as the budget lets it.
    """
    if points < 1 or budget < 1:
        return []
    if points * stages <= budget:
        return [(stages, points)]
    if stages == 1:
        return [(1, budget)]
    for first in range(stages - 1, 0, -1):
        rungs = [(first, points)]
        while rungs[-1][0] < stages:
            rung, n = rungs[-1]
            rungs.append((min(stages, rung * eta), -(-n // eta)))
        if plan_cost(rungs) <= budget:
            return _fill(rungs, budget)
    first = min(points, max(1, budget - stages + 1))
    return _fill([(1, first), (stages, 1)], budget)


def _fill(rungs: list[tuple[int, int]], budget: int) -> list[tuple[int, int]]:
    """The plan with the budget it leaves spent on more schedules at its last rung (at most all
    of the rung before)."""
    (before, n_before), (last, n) = rungs[-2], rungs[-1]
    more = min(n_before - n, max(0, budget - plan_cost(rungs)) // (last - before))
    return [*rungs[:-1], (last, n + more)]


def plan_cost(rungs: list[tuple[int, int]]) -> int:
    """Stages a halving plan trains: each rung's schedules, from the last rung's stage on."""
    cost, last = 0, 0
    for rung, n in rungs:
        cost, last = cost + n * (rung - last), rung
    return cost


@dataclass
class ScheduleSearch(OptunaSearch):
    """Searches per-stage schedules: every controlled hyperparameter at every stage is a param.

    Trials are stopped early by successive halving (``SuccessiveHalvingPruner``: rungs at 1, 3,
    9, ... stages, reduction factor ``reduction_factor``, on the dev score of each stage; the first
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

    def report(self, trial: Trial, stage: int, dev: float) -> None:
        trial.report(dev, step=stage + 1)   # step = stages trained, the pruner's resource

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


def _write_trial(trial: Trial, tracker: Tracker, schedule: list[dict[str, Any]],
                 devs: list[float], cost: dict[str, float]) -> None:
    """Written after every stage, so the stages of a trial killed mid-way are still paid and its
    schedule can be enqueued again; ``_record`` reads them back."""
    trial.set_user_attr("schedule", schedule)
    trial.set_user_attr("dev_scores", devs)
    trial.set_user_attr("cost", cost)
    trial.set_user_attr("episode_end", tracker.last_info.get("episode_end"))


def _record(t: optuna.trial.FrozenTrial) -> dict[str, Any]:
    return {"number": t.number, "state": t.state.name, "value": t.value,
            "schedule": t.user_attrs.get("schedule", []),
            "dev_scores": t.user_attrs.get("dev_scores", []),
            "stages": int(t.user_attrs.get("cost", {}).get("stages", 0)),
            "episode_end": t.user_attrs.get("episode_end")}


def _resume(study: optuna.Study, tracker: Tracker, requeue: bool) -> list[dict[str, Any]]:
    """Count the trials of earlier processes (their states are candidates of the selection rule,
    ``Tracker.resume``); return the params of those that finished (complete or pruned).

    A trial killed mid-way (left RUNNING) is marked FAIL, its paid stages counted; with
    ``requeue`` its params are enqueued to run first.
    """
    finished = []
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.RUNNING:
            # Killed mid-trial: its training is lost with that process, so it runs again.
            _tell(study, t.number, state=TrialState.FAIL)
            if requeue:
                study.enqueue_trial(t.params)
        if t.state == TrialState.WAITING:
            continue
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            finished.append(t.params)
        tracker.resume(_record(study.trials[t.number]), t.user_attrs.get("cost", {}))
    return finished


def rebuild(tracker: Tracker) -> None:
    """Replay from the root the chosen state of an earlier process (lost with it), where the
    budget pays for it; the rebuilt state takes its place (training is deterministic on CPU)."""
    lost = tracker.lost
    if lost is not None and tracker.remaining >= len(lost):
        devs = run_schedule(tracker, lost)
        tracker.trials.append({"replay": True, "schedule": lost, "dev_scores": devs,
                               "stages": len(devs)})
