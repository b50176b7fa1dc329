"""The schedule-structure statistic, measured against a null of random schedules.

The claim under test: capacity parameters (max_completion_length, num_generations) accumulate over
a schedule, regularization parameters (learning_rate, beta, temperature, epsilon) oscillate. On
every chosen schedule of at least MIN_STAGES stages, per parameter class:

- ``p_increase``: P(increase | change). Of the stage transitions where a parameter of the class
  changes value, the share that raise it, pooled over the class's parameters and the schedules.
  "Accumulates" means above the null; a constant schedule has no change and adds nothing.
- ``direction_changes_per_stage``: each parameter's turning points (up then down or down then up;
  flat runs skipped) divided by the schedule's stages, mean over the class's parameters, then
  over the schedules. "Oscillates" means above the null.

The null replaces every schedule by a random one of the same length: at each stage each parameter
takes a value drawn uniformly from its grid, independently, i.e. a uniformly random sequence of
the env's MultiDiscrete actions. The grid is the env's, rebuilt from the record's task and
``env_kwargs`` (``metaenv.hparams.build_hparam_space``); where it cannot be rebuilt (a task this
checkout does not know), the values recorded for that parameter on that task stand in for it.
Only controlled parameters (two or more grid values) count. Drawing N_NULL such schedule sets
gives the null's mean and 95% interval and a two-sided empirical p-value, (1 + #{|null - null
mean| >= |observed - null mean|}) / (1 + N_NULL).

Random schedules move more parameters, more often, than any controller does, so beside this null
there is a second, "shuffled": each chosen schedule with its stages in a random order. It keeps
the values a controller chose and asks only whether their order (rising capacity, turning
regularization) is more than chance.

Schedules are grouped by where they came from: "llm" (runs whose tree search took stages from the
LLM proposer), "skills" (the ``skills`` controller, and tree searches whose stages all came from
the skills: their moves offer capacity up but never down, a prior set by hand, so their shape is
not evidence either), "search" (every other searching controller) and "designed" (``fixed``,
``progressive``: their shape is set by hand, shown for completeness, never evidence).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

import numpy as np

from benchmarks.leaderboard.runlog import BASE, RunRecord

CAPACITY = ("max_completion_length", "num_generations")
REGULARIZATION = ("learning_rate", "beta", "temperature", "epsilon")
CLASSES = {"capacity": CAPACITY, "regularization": REGULARIZATION}
MIN_STAGES = 4  # the shortest schedule in which a value can rise, fall and rise again (3 moves)
N_NULL = 2000
DESIGNED = ("fixed", "progressive")
GROUPS = ("llm", "skills", "search", "designed")
STATISTICS = ("p_increase", "direction_changes_per_stage")

Grids = dict[str, tuple[float, ...]]


# ---- one trajectory -----------------------------------------------------------------------------


def direction_changes(values: Sequence[float]) -> int:
    """How often the value turns around (up then down, or down then up); flat runs don't count."""
    d = np.diff(np.asarray(values, dtype=np.float64))
    signs = np.sign(d[d != 0])
    return int(np.sum(signs[1:] != signs[:-1]))


def _moves(values: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(increases, changes, direction changes) of each row of values (n, stages)."""
    signs = np.sign(np.diff(values, axis=1))
    increases, changes = (signs > 0).sum(axis=1), (signs != 0).sum(axis=1)
    # Carry the last non-zero sign forward so a flat run between two moves is skipped.
    turns = np.zeros(values.shape[0], dtype=np.int64)
    last = np.zeros(values.shape[0])
    for s in signs.T:
        moved = s != 0
        turns += moved & (last != 0) & (s != last)
        last = np.where(moved, s, last)
    return increases, changes, turns


# ---- where schedules come from, and their grids -------------------------------------------------


def group_of(rec: RunRecord) -> str:
    """"llm", "skills", "search" or "designed": who shaped this run's chosen schedule."""
    from controllers.proposers import LLM, SKILLS

    sources = rec.extra.get("stage_sources", [])
    if LLM in sources:
        return "llm"
    if rec.controller == SKILLS or (sources and set(sources) == {SKILLS}):
        return "skills"
    return "designed" if rec.controller in DESIGNED else "search"


@cache
def _env_grids(task: str, env_kwargs: str) -> Grids | None:
    from metaenv.hparams import build_hparam_space

    kw = json.loads(env_kwargs)
    try:
        space, _ = build_hparam_space(task, kw.get("scale", "embedded"), kw.get("hparam_grid"),
                                      kw.get("fixed_hparams"))
    except (KeyError, ValueError):  # a task or grid this checkout does not know
        return None
    return {n: tuple(float(v) for v in g) for n, g in space.grids.items()
            if all(_numeric(v) for v in g)}


def _numeric(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _seen_grids(records: Sequence[RunRecord]) -> dict[str, Grids]:
    """task -> parameter -> every value recorded for it (stages and chosen schedules)."""
    seen: dict[str, dict[str, set[float]]] = {}
    for r in records:
        for hp in [*(s.hparams for s in r.stages), *r.schedule]:
            for name in (*CAPACITY, *REGULARIZATION):
                if _numeric(v := hp.get(name)):
                    seen.setdefault(r.task, {}).setdefault(name, set()).add(float(v))
    return {t: {n: tuple(sorted(vs)) for n, vs in by.items()} for t, by in seen.items()}


def grid_lookup(records: Sequence[RunRecord]) -> Callable[[RunRecord], tuple[Grids, str]]:
    """rec -> (its controlled grids, "env" or "seen"): the env's grid, else the values seen."""
    seen = _seen_grids(records)

    def lookup(rec: RunRecord) -> tuple[Grids, str]:
        kw = rec.settings.get("env_kwargs", {})
        grids = _env_grids(rec.task, json.dumps(kw, sort_keys=True, default=str))
        source = "env"
        if grids is None:
            grids, source = seen.get(rec.task, {}), "seen"
        return {n: g for n, g in grids.items() if len(g) >= 2}, source

    return lookup


# ---- per schedule -------------------------------------------------------------------------------


def trajectories(rec: RunRecord, grids: Grids, params: Sequence[str]) -> dict[str, list[float]]:
    """The chosen schedule's values of each controlled parameter of `params` it holds at every
    stage as a number."""
    out = {}
    for name in params:
        values = [hp.get(name) for hp in rec.schedule]
        if name in grids and values and all(_numeric(v) for v in values):
            out[name] = [float(v) for v in values]
    return out


def _per_schedule(paths: dict[str, list[float]], stages: int) -> dict[str, float]:
    if not paths:
        return {"increases": 0, "changes": 0, "direction_changes_per_stage": math.nan}
    inc, chg, turns = _moves(np.asarray(list(paths.values())))
    return {"increases": int(inc.sum()), "changes": int(chg.sum()),
            "direction_changes_per_stage": float(np.mean(turns) / stages)}


def schedule_rows(records: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """One row per non-base run: its group, length, and each class's counts (structure.csv)."""
    lookup = grid_lookup(records)
    rows = []
    for r in sorted(records, key=lambda r: r.key):
        if r.controller == BASE:
            continue
        grids, source = lookup(r)
        row: dict[str, Any] = {"task": r.task, "controller": r.controller, "seed": r.seed,
                               "group": group_of(r), "stages": len(r.schedule),
                               "included": len(r.schedule) >= MIN_STAGES, "grid": source}
        for kind, params in CLASSES.items():
            for k, v in _per_schedule(trajectories(r, grids, params), len(r.schedule)).items():
                row[f"{kind}_{k}"] = v
        rows.append(row)
    return rows


# ---- a set of schedules against its null --------------------------------------------------------


def _statistics(inc: np.ndarray, chg: np.ndarray, dcps: np.ndarray) -> tuple[Any, Any]:
    """(p_increase, direction changes per stage) from per-schedule arrays, last axis schedules.

    A schedule without a controlled parameter of the class (NaN) is left out of the mean.
    """
    total = chg.sum(axis=-1)
    p_inc = np.where(total > 0, inc.sum(axis=-1) / np.maximum(total, 1), np.nan)
    held = np.isfinite(dcps)
    n = held.sum(axis=-1)
    mean = np.where(n > 0, np.where(held, dcps, 0.0).sum(axis=-1) / np.maximum(n, 1), np.nan)
    return p_inc, mean


Draw = Callable[[np.random.Generator, int], list[np.ndarray]]  # rng, n -> (n, stages) per param


def uniform_draw(grids: dict[str, tuple[float, ...]], stages: int) -> Draw:
    """Random schedules: each stage's value of each parameter uniform on its grid."""
    def draw(rng: np.random.Generator, n: int) -> list[np.ndarray]:
        return [np.asarray(g)[rng.integers(0, len(g), size=(n, stages))] for g in grids.values()]

    return draw


def shuffled_draw(paths: dict[str, list[float]]) -> Draw:
    """The same schedule with its stages in a random order (all parameters moved together)."""
    m = np.asarray(list(paths.values()))  # (params, stages)
    if not paths:
        return lambda rng, n: []

    def draw(rng: np.random.Generator, n: int) -> list[np.ndarray]:
        order = np.argsort(rng.random((n, m.shape[1])), axis=1)
        return [row[order] for row in m]

    return draw


def _null(draws: list[tuple[Draw, int]], n_null: int, rng: np.random.Generator
          ) -> tuple[np.ndarray, np.ndarray]:
    """n_null draws of (p_increase, direction changes per stage) of a set of schedules, each
    schedule drawn by its own Draw."""
    inc = np.zeros((n_null, len(draws)))
    chg = np.zeros((n_null, len(draws)))
    dcps = np.full((n_null, len(draws)), np.nan)
    for j, (draw, stages) in enumerate(draws):
        turns = []
        for values in draw(rng, n_null):
            i, c, t = _moves(values)
            inc[:, j] += i
            chg[:, j] += c
            turns.append(t)
        if turns:
            dcps[:, j] = np.mean(turns, axis=0) / stages
    return _statistics(inc, chg, dcps)


def _against_null(observed: float, null: np.ndarray, level: float = 0.95) -> dict[str, Any]:
    """The null's mean and central interval, and the two-sided empirical p of the observation."""
    null = null[np.isfinite(null)]
    if not math.isfinite(observed) or null.size == 0:
        return {"null_mean": math.nan, "null_ci": [math.nan, math.nan], "p_value": math.nan}
    centre = float(null.mean())
    lo, hi = np.quantile(null, [(1 - level) / 2, 1 - (1 - level) / 2])
    # A tolerance so a null draw equal to the observation counts as at least as extreme.
    extreme = np.abs(null - centre) >= abs(observed - centre) - 1e-12
    return {"null_mean": centre, "null_ci": [float(lo), float(hi)],
            "p_value": float((1 + extreme.sum()) / (1 + null.size))}


def class_against_null(records: Sequence[RunRecord], params: Sequence[str],
                       lookup: Callable[[RunRecord], tuple[Grids, str]], n_null: int = N_NULL,
                       seed: int = 0) -> dict[str, Any]:
    """Both statistics of one parameter class on these schedules, each against two nulls.

    null_*: random schedules from the grid (the module's null). shuffled_*: each schedule with
    its stages permuted, which keeps the values a controller chose and tests only their order.
    """
    obs_inc, obs_chg, obs_dcps, uniform, shuffled = [], [], [], [], []
    for r in records:
        grids = lookup(r)[0]
        paths = trajectories(r, grids, params)
        one = _per_schedule(paths, len(r.schedule))
        obs_inc.append(one["increases"])
        obs_chg.append(one["changes"])
        obs_dcps.append(one["direction_changes_per_stage"])
        uniform.append((uniform_draw({n: grids[n] for n in paths}, len(r.schedule)),
                        len(r.schedule)))
        shuffled.append((shuffled_draw(paths), len(r.schedule)))
    observed = _statistics(np.asarray(obs_inc, float), np.asarray(obs_chg, float),
                           np.asarray(obs_dcps, float))
    nulls = {"": _null(uniform, n_null, np.random.default_rng(seed)),
             "shuffled_": _null(shuffled, n_null, np.random.default_rng(seed))}
    out: dict[str, Any] = {"params": sorted({n for r in records
                                             for n in trajectories(r, lookup(r)[0], params)}),
                           "changes": int(sum(obs_chg))}
    for i, stat in enumerate(STATISTICS):
        out[stat] = {"value": float(observed[i])}
        for prefix, null in nulls.items():
            out[stat] |= {f"{prefix}{k}" if prefix else k: v
                          for k, v in _against_null(float(observed[i]), null[i]).items()}
    return out


def summarize(records: Sequence[RunRecord], n_null: int = N_NULL, seed: int = 0
              ) -> dict[str, Any]:
    """summary.json's "structure": per group, the counts and each class against its null."""
    runs = [r for r in records if r.controller != BASE]
    lookup = grid_lookup(records)
    groups: dict[str, Any] = {}
    for g in GROUPS:
        mine = [r for r in runs if group_of(r) == g]
        kept = [r for r in mine if len(r.schedule) >= MIN_STAGES]
        entry: dict[str, Any] = {"schedules": len(kept), "excluded_short": len(mine) - len(kept),
                                 "controllers": sorted({r.controller for r in kept})}
        for kind, params in CLASSES.items():
            entry[kind] = class_against_null(kept, params, lookup, n_null, seed)
        groups[g] = entry
    grids_from = sorted({lookup(r)[1] for r in runs})
    return {"min_stages": MIN_STAGES, "n_null": n_null, "classes": {k: list(v) for k, v in
                                                                     CLASSES.items()},
            "null": "each stage's value of each parameter uniform on its grid, independently",
            "grids_from": grids_from, "groups": groups}
