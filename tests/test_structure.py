"""The schedule-structure statistic against its null of random schedules, on hand-made schedules."""

from __future__ import annotations

import numpy as np
import pytest

from benchmarks.leaderboard import structure
from benchmarks.leaderboard.runlog import RunRecord

# countdown's embedded grids, so the null comes from the env's own action space.
LR = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)
LENGTH = (32, 48, 64, 80)
GENERATIONS = (4, 8, 16)


def run(schedule, controller="grid", seed=0, task="countdown", **extra) -> RunRecord:
    return RunRecord(task=task, controller=controller, seed=seed, test_score=0.3, dev_score=0.3,
                     base_dev_score=0.1, budget=8, stages_spent=8, schedule=schedule, extra=extra)


def _turning_points(values):
    """Independent count of direction changes: collapse repeats, count strict local extrema."""
    v = [x for i, x in enumerate(values) if i == 0 or x != values[i - 1]]
    return sum(1 for i in range(1, len(v) - 1) if (v[i] > v[i - 1]) != (v[i + 1] > v[i]))


def test_direction_changes_and_moves_agree_with_a_direct_count():
    assert structure.direction_changes([1e-4, 3e-5, 1e-4, 1e-4, 3e-5, 3e-5]) == 2
    assert structure.direction_changes([0.1]) == 0
    rng = np.random.default_rng(0)
    values = rng.choice([0.0, 0.01, 0.04, 0.1], size=(300, 7))
    inc, chg, turns = structure._moves(values)
    for row, i, c, t in zip(values, inc, chg, turns, strict=True):
        d = np.diff(row)
        assert (i, c) == (np.sum(d > 0), np.sum(d != 0))
        assert t == _turning_points(list(row)) == structure.direction_changes(row)


def _increasing(stages: int, offset: int) -> list[dict]:
    """Capacity only ever rises (it stays flat at the top); the learning rate turns every stage."""
    return [{"max_completion_length": LENGTH[min(i // 2 + offset, 3)],
             "num_generations": GENERATIONS[min(i // 3, 2)],
             "learning_rate": LR[1 + (i + offset) % 2], "beta": 0.04, "temperature": 1.0}
            for i in range(stages)]


def test_an_always_increasing_schedule_set_differs_from_the_null():
    runs = [run(_increasing(6 + s % 3, s % 2), seed=s) for s in range(10)]
    cls = structure.class_against_null(runs, structure.CAPACITY,
                                       structure.grid_lookup(runs), n_null=1000)
    p_inc = cls["p_increase"]
    assert p_inc["value"] == 1.0 and p_inc["p_value"] < 0.01
    # Uniform draws go up as often as down: the null centres on 1/2.
    assert p_inc["null_mean"] == pytest.approx(0.5, abs=0.02)
    assert p_inc["null_ci"][0] < 0.5 < p_inc["null_ci"][1]
    assert cls["params"] == ["max_completion_length", "num_generations"]
    # Their own values in a random order rise no more often than they fall either.
    assert p_inc["shuffled_null_ci"][1] < 1.0 and p_inc["shuffled_p_value"] < 0.01
    reg = structure.class_against_null(runs, structure.REGULARIZATION,
                                       structure.grid_lookup(runs), n_null=1000)
    # The learning rate turns at every inner stage; beta and temperature never move.
    stages = np.array([len(r.schedule) for r in runs])
    expected = np.mean((stages - 2) / stages / 3)  # lr, beta, temperature on the grid
    assert reg["direction_changes_per_stage"]["value"] == pytest.approx(expected)
    # Alternating every stage turns more often than the same values in a random order.
    shuffled = reg["direction_changes_per_stage"]
    assert shuffled["value"] > shuffled["shuffled_null_ci"][1]
    assert shuffled["shuffled_p_value"] < 0.01


def test_random_schedules_from_the_grid_match_their_null():
    rng = np.random.default_rng(3)
    runs = [run([{"max_completion_length": int(rng.choice(LENGTH)),
                  "num_generations": int(rng.choice(GENERATIONS)),
                  "learning_rate": float(rng.choice(LR)), "beta": 0.04, "temperature": 1.0}
                 for _ in range(8)], seed=s) for s in range(12)]
    cls = structure.class_against_null(runs, structure.CAPACITY,
                                       structure.grid_lookup(runs), n_null=1000)
    for stat in structure.STATISTICS:
        for null in ("", "shuffled_"):
            lo, hi = cls[stat][f"{null}null_ci"]
            assert lo <= cls[stat]["value"] <= hi and cls[stat][f"{null}p_value"] > 0.05


def test_groups_short_schedules_and_grid_sources():
    short = [{"learning_rate": 1e-4}] * 3
    records = [run(_increasing(5, 0), "llmzero", 0, stage_sources=["skills", "llm"]),
               run(_increasing(5, 0), "llmzero", 1, stage_sources=["skills"]),
               run(_increasing(5, 1), "fixed", 0), run(short, "tpe", 0),
               run(_increasing(4, 0), "tpe", 1, task="unknown-task"),
               run(_increasing(4, 1), "skills", 2)]
    s = structure.summarize(records, n_null=200)
    groups = s["groups"]
    assert (groups["llm"]["schedules"], groups["llm"]["controllers"]) == (1, ["llmzero"])
    # The skills' hand-set moves (capacity only grows) are their own group, never "search".
    assert groups["skills"]["schedules"] == 2
    assert sorted(groups["skills"]["controllers"]) == ["llmzero", "skills"]
    assert groups["search"]["schedules"] == 1 and groups["search"]["excluded_short"] == 1
    assert groups["designed"]["controllers"] == ["fixed"]
    assert s["min_stages"] == structure.MIN_STAGES == 4
    rows = {(r["controller"], r["seed"], r["task"]): r for r in structure.schedule_rows(records)}
    assert rows["tpe", 0, "countdown"]["included"] is False
    assert rows["tpe", 1, "unknown-task"]["grid"] == "seen"  # no env grid for it
    assert rows["llmzero", 0, "countdown"]["grid"] == "env"
    assert rows["llmzero", 0, "countdown"]["group"] == "llm"
