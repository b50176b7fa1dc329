"""The leaderboard report on hand-made runs: summary.json, verdicts, Holm, transfer, smoke runs."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from benchmarks.leaderboard import pairs, report, stats
from benchmarks.leaderboard.runlog import RunRecord

SEEDS = range(5)
TASKS = ("a", "b")
N_ITEMS = 60
N_BOOT = 400  # enough for verdicts this clear; keeps the file fast


def items(p: float, seed: int, task: str) -> list[bool]:
    """A deterministic 0/1 item vector with about p of the items right."""
    rng = np.random.default_rng([seed, ord(task[0]), int(1000 * p)])
    return (rng.random(N_ITEMS) < p).tolist()


STAGE = {"learning_rate": 1e-4, "num_generations": 8}


def rec(task: str, ctrl: str, seed: int, correct: list[bool] | None = None, score: float = 0.0,
        budget: int = 32, schedule: list | None = None, **extra) -> RunRecord:
    correct = list(correct or [])
    test = float(np.mean(correct)) if correct else score
    if schedule is None:
        schedule = [] if ctrl == "base" else [dict(STAGE)] * 8
    return RunRecord(task=task, controller=ctrl, seed=seed, test_score=test, dev_score=test,
                     base_dev_score=0.1, budget=0 if ctrl == "base" else budget,
                     stages_spent=0 if ctrl == "base" else budget, tokens=1000.0, seconds=5.0,
                     test_correct=correct, extra=extra, schedule=schedule,
                     settings={"env_kwargs": {"stages": 8},
                               **({} if ctrl == "base" else {"budget_unit": "tokens"})})


DESIGN = [dict(STAGE), {**STAGE, "num_generations": 4}, {**STAGE, "num_generations": 16}]
CACHE = {"hits": 3, "misses": 5, "seconds_saved": 2.5}


def standard_like() -> list[RunRecord]:
    """grid, fixed and skills at 0.4; "better" at 0.8, "worse" at 0.1; "same" copies grid item
    by item. Every run used the stage cache; grid's runs carry the design; one "worse" run
    returned the base model, and says why."""
    out = []
    for task in TASKS:
        out.append(rec(task, "base", 0, items(0.1, 0, task)))
        for s in SEEDS:
            grid = items(0.4, s, task)
            out += [rec(task, "grid", s, grid, grid_design=DESIGN, stage_cache=CACHE,
                         points_tried=[{"point": 0, "stages": 8}, {"point": 2, "stages": 1}]),
                    rec(task, "fixed", s, items(0.4, s + 10, task), stage_cache=CACHE),
                    rec(task, "skills", s, items(0.4, s + 30, task)),
                    rec(task, "better", s, items(0.8, s, task)),
                    rec(task, "worse", s, items(0.1, s + 20, task),
                        **({"schedule": [], "select_fallback": True,
                            "untrained_reason": "no episode ended"} if s == 0 else {})),
                    rec(task, "same", s, list(grid))]
    return out


ORDER = ["fixed", "grid", "skills", "better", "worse", "same"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    records = standard_like()
    report.write_report(out, records, header="Made by `python -m benchmarks.leaderboard`",
                        order=ORDER, n_boot=N_BOOT)
    return out, records


def _mean_diff(records, task, ctrl, ref):
    by = {(r.controller, r.seed): r.test_score for r in records if r.task == task}
    x = [by.get((ctrl, s), by.get((ctrl, 0))) for s in SEEDS]  # the base model: one run, seed 0
    return float(np.mean([xs - by[ref, s] for xs, s in zip(x, SEEDS, strict=True)]))


def test_summary_json_layout_and_verdicts(built):
    out, records = built
    s = json.loads((out / "summary.json").read_text())
    assert {"seeds", "pairs", "pairs_vs_fixed", "tree_full_depth_share", "iqm",
            "structure"} <= set(s)
    assert s["seeds"] == list(SEEDS) and not s["smoke"]
    for key, ref in (("pairs", "grid"), ("pairs_vs_fixed", "fixed"), ("pairs_vs_skills", "skills")):
        assert set(s[key]) == set(TASKS)
        for task in TASKS:
            cell = s[key][task]
            assert set(cell) == {"base", *ORDER}
            for ctrl, p in cell.items():
                assert set(p) >= {"mean_diff", "ci", "t_ci", "verdict", "p_holm", "p_t_holm",
                                  "poi", "ci_method"}
                assert p["mean_diff"] == pytest.approx(_mean_diff(records, task, ctrl, ref))
                assert p["ci_method"] == "seeds x items" and p["n_items"] == N_ITEMS
            assert cell["better"]["ci"][0] > 0 and cell["better"]["t_ci"][0] > 0
            assert "better" in cell["better"]["verdict"]
            assert cell["worse"]["ci"][1] < 0 and cell["worse"]["t_ci"][1] < 0
            assert "worse" in cell["worse"]["verdict"]
            assert cell[ref]["verdict"] == "reference"
    same = s["pairs"]["a"]["same"]
    assert (same["mean_diff"], same["ci"], same["verdict"]) == (0.0, [0.0, 0.0], "no difference")
    # The base model (one run per task) pairs with every seed.
    assert s["pairs"]["a"]["base"]["n_seeds"] == len(SEEDS)
    assert s["pairs"]["a"]["base"]["verdict"] == "worse"
    # What a reader must know first: the budget's unit, the one selection rule, the grid's design,
    # the stage cache's totals over every run, and the runs that returned the base model.
    assert s["budget_unit"] == "tokens" and s["select_rule"] == "final"
    assert s["grid_design"] == {t: DESIGN for t in TASKS}
    n_cached = 2 * len(TASKS) * len(SEEDS)   # the grid and fixed runs
    assert s["stage_cache"] == {"hits": 3 * n_cached, "misses": 5 * n_cached,
                                "seconds_saved": pytest.approx(2.5 * n_cached)}
    assert s["untrained"] == {t: [{"controller": "worse", "seed": 0,
                                   "reason": "no episode ended"}] for t in TASKS}
    iqm = s["iqm"]
    assert iqm["better"]["diff_vs_skills"]["ci"][0] > 0
    assert iqm["better"]["diff_vs_grid"]["ci"][0] > 0 and iqm["worse"]["diff_vs_grid"]["ci"][1] < 0
    assert iqm["better"]["poi_vs_grid"]["point"] == 1.0
    assert iqm["better"]["n_seeds"] == len(SEEDS) and iqm["better"]["tasks"] == list(TASKS)


def test_runs_csv_and_markdown(built):
    out, records = built
    with open(out / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:8] == ["task", "controller", "seed", "test_score", "dev_score",
                                 "stages", "tokens", "seconds"]
    assert len(rows) == len(records)
    by = {(r["task"], r["controller"], r["seed"]): r for r in rows}
    grid, worse = by["a", "grid", "0"], by["a", "worse", "0"]
    assert grid["schedule_stages"] == "8" and grid["points_tried"] == "0:8 2:1"
    assert grid["cache_hits"] == "3"
    assert (worse["schedule_stages"], worse["select_fallback"]) == ("0", "True")
    assert worse["untrained_reason"] == "no episode ended" and by["a", "worse", "1"][
        "untrained_reason"] == ""
    md = (out / "leaderboard.md").read_text()
    assert "Made by `python -m benchmarks.leaderboard`" in md
    assert "budget unit: tokens" in md and "Selection rule, one for every controller" in md
    assert "Stage cache: 60 stages loaded (hits) and 100 trained (misses)" in md
    assert "- worse, seed 0: no episode ended." in md.split("## a\n")[1].split("## b\n")[0]
    # The ablation's table: every row against skills, llmzero's question in its caption.
    caption, skills_head = md.split("Paired test-score difference from skills")[1].split(
        "\n\n")[:2]
    assert "llmzero − skills" in caption
    row = next(x for x in skills_head.splitlines() if x.startswith("| better |"))
    assert all(c.strip().endswith("better") for c in row.split("|")[2:2 + len(TASKS)])
    assert "Smoke run" not in md
    for section in ("## a", "## Across tasks", "## Schedule structure against its null",
                    "## Cost"):
        assert section in md
    task_a = md.split("## a\n")[1]
    line = next(x for x in task_a.splitlines() if x.startswith("| better |"))
    assert "better" in line.split("|")[4]  # the per-task vs-grid cell carries its verdict
    head = md.split("Paired test-score difference from grid")[1].split("\n\n")[1]
    row = next(x for x in head.splitlines() if x.startswith("| better |"))
    assert all(c.strip().endswith("better") for c in row.split("|")[2:2 + len(TASKS)])


def test_holm_adjusts_each_controller_across_tasks():
    records = standard_like()
    # A third task where "better" is only a little better: a larger p for the family.
    for s in SEEDS:
        records += [rec("c", "grid", s, items(0.4, s, "c")),
                    rec("c", "better", s, items(0.45, s, "c"))]
    out = pairs.compare(records, "grid", ORDER, n_boot=N_BOOT)
    for ctrl in ("better", "worse"):
        family = [out[t][ctrl] for t in sorted(out) if ctrl in out[t]]
        assert [p["p_holm"] for p in family] == stats.holm([p["p_value"] for p in family])
        assert [p["p_t_holm"] for p in family] == stats.holm([p["p_t"] for p in family])
        for p in family:
            assert p["p_holm"] >= p["p_value"] and p["p_t_holm"] >= p["p_t"]
            significant = max(p["p_holm"], p["p_t_holm"]) < 0.05
            expected = ("better" if p["mean_diff"] > 0 else "worse") if significant else \
                "no difference"
            assert p["verdict_holm"] == expected
    assert out["a"]["better"]["verdict_holm"] == "better"


def test_a_cell_names_the_holm_verdict_only_where_it_differs():
    row = {"vs_grid_diff": 0.03, "vs_grid_ci_low": 0.01, "vs_grid_ci_high": 0.05,
           "vs_grid_verdict": "better", "vs_grid_verdict_holm": "no difference"}
    cell = report._diff_cell(row, "vs_grid")
    assert cell == "+0.030 [+0.010, +0.050] better (Holm: no difference)"
    assert report._diff_cell(row | {"vs_grid_verdict_holm": "better"}, "vs_grid").endswith("better")
    one_seed = row | {"vs_grid_verdict": "n/a (1 paired seed)", "vs_grid_verdict_holm": "n/a"}
    assert "Holm" not in report._diff_cell(one_seed, "vs_grid")


def test_missing_items_fall_back_to_seeds_and_say_so():
    records = []
    for s in SEEDS:
        records += [rec("a", "grid", s, score=0.4 + 0.01 * s),
                    rec("a", "better", s, score=0.6 + 0.02 * s)]
    p = pairs.compare(records, "grid", ["grid", "better"], n_boot=N_BOOT)["a"]["better"]
    assert p["ci_method"] == "seeds" and p["n_items"] == 0
    assert p["mean_diff"] == pytest.approx(0.2 + 0.01 * np.mean(SEEDS)) and p["verdict"] == "better"


def test_transfer_column_pairs_replays_with_grid():
    records = []
    for s in SEEDS:
        g, b = items(0.3, s + 50, "a"), items(0.7, s + 60, "a")
        records += [
            rec("a", "grid", s, items(0.4, s, "a"),
                transfer=[{"seed": 100 + s, "test_score": float(np.mean(g)), "test_correct": g}]),
            rec("a", "better", s, items(0.4, s, "a"),
                transfer=[{"seed": 100 + s, "test_score": float(np.mean(b)), "test_correct": b},
                          {"seed": 200 + s, "test_score": 0.5}])]  # a replay without items
    t = pairs.transfer(records, ["grid", "better"], n_boot=N_BOOT)["a"]
    scores = [np.mean([np.mean(items(0.7, s + 60, "a")), 0.5]) for s in SEEDS]
    assert t["better"]["mean"] == pytest.approx(np.mean(scores))
    assert t["better"]["replays"] == 10
    assert t["better"]["vs_grid"]["verdict"] == "better"
    assert t["better"]["vs_grid"]["ci_method"] == "seeds"  # one replay lacks its items
    rows = report.runs_rows(records)
    assert rows[0]["transfer_test"] == pytest.approx(scores[0])


def test_tree_full_depth_share_reads_episode_stages():
    def tree(seed, length, **extra):
        r = rec("a", "llmzero", seed, score=0.3, **extra)
        r.schedule = [{"learning_rate": 1e-4}] * length
        return r

    records = [tree(0, 8), tree(1, 8, episode_stages=8), tree(2, 3), tree(3, 4, episode_stages=4),
               rec("a", "grid", 0, score=0.3)]
    depth = report.tree_full_depth(records)
    assert (depth["full_depth"], depth["runs"]) == (3, 4)
    assert depth["share"] == pytest.approx(0.75)
    assert math.isnan(report.tree_full_depth(records[-1:])["share"])


def test_a_smoke_run_says_so(tmp_path, capsys):
    quick = [rec("a", "base", 0, items(0.1, 0, "a")), rec("a", "grid", 0, items(0.4, 0, "a"),
                                                          budget=6)]
    report.write_report(tmp_path / "quick", quick, n_boot=N_BOOT)
    md = (tmp_path / "quick" / "leaderboard.md").read_text()
    assert "Smoke run, not for conclusions" in md
    assert "smoke run, not for conclusions" in capsys.readouterr().out
    assert json.loads((tmp_path / "quick" / "summary.json").read_text())["smoke"]
    # Many seeds and a real budget are not enough when the harness says it ran a smoke preset.
    assert report.smoke_reason(standard_like()) == ""
    assert report.smoke_reason(standard_like(), conclusions=False)
    one_seed = [r for r in standard_like() if r.seed == 0]
    assert "one seed" in report.smoke_reason(one_seed)
