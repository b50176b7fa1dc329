"""The leaderboard's report: runs.csv, summary.json, leaderboard.md/csv, structure.csv, plots.

Everything here is computed from RunRecords (``runlog``), so a report can be rebuilt from
``leaderboard.h5`` alone: ``python -m benchmarks.leaderboard.report results/standard/``.
The statistics are paired by seed (``pairs``, ``stats``); the structure statistic and its null
are in ``structure``; the figures in ``plots``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from benchmarks.leaderboard import pairs, plots, stats, structure
from benchmarks.leaderboard.pairs import N_BOOT, REFERENCES
from benchmarks.leaderboard.runlog import (
    BASE,
    COMBINED,
    RUNS_DIR,
    RunRecord,
    UnreadableRunLog,
    read_combined,
)
from controllers.base import SELECT_RULE, SELECT_RULE_TEXT

REFERENCE = REFERENCES["pairs"]  # grid search: the paper's second figure is relative to it
SMOKE_BUDGET = 6  # the quick preset's budget: a run this small answers nothing
TREE = "llmzero"  # rows whose name starts with this are the tree search (the LLM row too)


# ---- tables --------------------------------------------------------------------------------------


def relative(x: float, ref: float) -> float:
    """Relative improvement (x - ref) / ref; NaN where the reference is 0 or missing."""
    if not math.isfinite(ref) or ref == 0 or not math.isfinite(x):
        return math.nan
    return (x - ref) / abs(ref)


def _nanmean(values: Sequence[float]) -> float:
    v = [x for x in values if _finite(x)]
    return float(np.mean(v)) if v else math.nan


def _order(records: Sequence[RunRecord], order: Sequence[str] | None) -> list[str]:
    """Controllers in the given order, then any others alphabetically; never the base."""
    return plots._order(records, order)


def _cost(record: RunRecord, key: str) -> float:
    value = record.extra.get("cost", {}).get(key)
    return float(value) if isinstance(value, (int, float)) else math.nan


NO_PAIR: dict[str, Any] = {"mean_diff": math.nan, "ci": [math.nan, math.nan], "verdict": "",
                           "p_holm": math.nan, "verdict_holm": "", "ci_method": "none",
                           "poi": math.nan, "t_ci": [math.nan, math.nan], "p_t_holm": math.nan}


@dataclass(frozen=True)
class Runs:
    """The runs of one (task, controller) and what their columns are measured against."""

    runs: list[RunRecord]  # sorted by seed; the base row holds the base records
    base_test: float
    base_dev: float
    grid_test: float  # the reference's mean test score (NaN without a grid row)
    vs: dict[str, dict[str, Any]] = field(default_factory=dict)  # reference -> pairs.pair
    transfer: dict[str, Any] = field(default_factory=dict)  # pairs.transfer's entry

    @cached_property
    def test_ci(self) -> tuple[float, float, float]:
        """(mean, low, high) of the test score over seeds; bootstrapped once per group."""
        return stats.bootstrap_ci([r.test_score for r in self.runs])

    def mean(self, value: Callable[[RunRecord], float]) -> float:
        return _nanmean([value(r) for r in self.runs])

    def pair(self, reference: str) -> dict[str, Any]:
        return self.vs.get(reference) or NO_PAIR


@dataclass(frozen=True)
class Column:
    """One report column: a CSV field and, when `header` is set, a per-task Markdown column.

    `compute` measures a (task, controller) group; `base` overrides it on the base model's row;
    `cell` writes the Markdown cell from the whole row; an `optional` column is shown only when
    some row `has_value` (by default a finite, non-zero one).
    """

    key: str
    header: str | None
    compute: Callable[[Runs], Any]
    cell: Callable[[dict[str, Any]], str] | None = None
    base: Callable[[Runs], Any] | None = None
    optional: bool = False
    has_value: Callable[[Any], bool] = lambda x: _finite(x) and x != 0


def _is_base(row: dict[str, Any]) -> bool:
    return row["controller"] == BASE


def _diff_cell(row: dict[str, Any], key: str) -> str:
    """A paired difference as "+0.012 [-0.010, +0.031] no difference", and the Holm-adjusted
    verdict where it differs from the CI's."""
    verdict = row[f"{key}_verdict"]
    if verdict == "reference":
        return "—"
    if not _finite(row[f"{key}_diff"]):
        return "n/a"
    ci = ""
    if _finite(row[f"{key}_ci_low"]):
        ci = f" [{_fmt(row[f'{key}_ci_low'], '+.3f')}, {_fmt(row[f'{key}_ci_high'], '+.3f')}]"
    text = f"{_fmt(row[f'{key}_diff'], '+.3f')}{ci} {verdict}".strip()
    holm = row.get(f"{key}_verdict_holm") or "n/a"  # "n/a": no Holm p (e.g. one seed)
    return text + (f" (Holm: {holm})" if holm not in ("n/a", verdict) else "")


def _pair_columns(key: str, get: Callable[[Runs], dict[str, Any]], header: str | None,
                  optional: bool = False) -> tuple[Column, ...]:
    """The CSV fields of one paired difference, and its Markdown column (if `header`)."""
    return (
        Column(f"{key}_diff", header, lambda g: get(g)["mean_diff"],
               lambda r: _diff_cell(r, key), optional=optional),
        Column(f"{key}_ci_low", None, lambda g: get(g)["ci"][0]),
        Column(f"{key}_ci_high", None, lambda g: get(g)["ci"][1]),
        Column(f"{key}_verdict", None, lambda g: get(g)["verdict"]),
        Column(f"{key}_t_low", None, lambda g: get(g)["t_ci"][0]),
        Column(f"{key}_t_high", None, lambda g: get(g)["t_ci"][1]),
        Column(f"{key}_p_holm", None, lambda g: get(g)["p_holm"]),
        Column(f"{key}_p_t_holm", None, lambda g: get(g)["p_t_holm"]),
        Column(f"{key}_verdict_holm", None, lambda g: get(g)["verdict_holm"]),
        Column(f"{key}_poi", None, lambda g: get(g)["poi"]),
        Column(f"{key}_ci_method", None, lambda g: get(g)["ci_method"]),
    )


def _transfer(g: Runs) -> dict[str, Any]:
    return g.transfer or {"mean": math.nan, "ci": [math.nan, math.nan], "vs_grid": None}


COLUMNS: tuple[Column, ...] = (
    Column("n_seeds", "seeds", lambda g: len(g.runs), lambda r: str(r["n_seeds"])),
    Column("test_mean", "test [95% CI]", lambda g: g.test_ci[0],
           lambda r: _fmt(r["test_mean"]) if _is_base(r) or not _finite(r["test_ci_low"]) else
           f"{_fmt(r['test_mean'])} [{_fmt(r['test_ci_low'])}, {_fmt(r['test_ci_high'])}]"),
    Column("test_ci_low", None, lambda g: g.test_ci[1] if len(g.runs) > 1 else math.nan),
    Column("test_ci_high", None, lambda g: g.test_ci[2] if len(g.runs) > 1 else math.nan),
    *_pair_columns("vs_grid", lambda g: g.pair(REFERENCES["pairs"]), "vs grid"),
    *_pair_columns("vs_fixed", lambda g: g.pair(REFERENCES["pairs_vs_fixed"]), "vs fixed"),
    *_pair_columns("vs_skills", lambda g: g.pair(REFERENCES["pairs_vs_skills"]), "vs skills",
                   optional=True),
    Column("transfer_mean", "transfer", lambda g: _transfer(g)["mean"],
           lambda r: _fmt(r["transfer_mean"]), optional=True, has_value=lambda x: _finite(x)),
    Column("transfer_ci_low", None, lambda g: _transfer(g)["ci"][0]),
    Column("transfer_ci_high", None, lambda g: _transfer(g)["ci"][1]),
    *_pair_columns("transfer_vs_grid", lambda g: _transfer(g)["vs_grid"] or NO_PAIR,
                   "transfer vs grid", optional=True),
    Column("rel_vs_base", "vs base", lambda g: relative(g.test_ci[0], g.base_test),
           lambda r: "—" if _is_base(r) else _pct(r["rel_vs_base"]), base=lambda g: 0.0),
    Column("rel_vs_grid", None, lambda g: relative(g.test_ci[0], g.grid_test)),
    Column("dev_mean", "dev", lambda g: g.mean(lambda r: r.dev_score),
           lambda r: _fmt(r["dev_mean"]), base=lambda g: g.base_dev),
    Column("budget", None, lambda g: max(r.budget for r in g.runs), base=lambda g: 0),
    Column("stages_mean", "stages / budget", lambda g: g.mean(lambda r: r.stages_spent),
           lambda r: f"{_fmt(r['stages_mean'], '.1f')} / {r['budget']}", base=lambda g: 0.0),
    Column("unspent_runs", None, lambda g: sum(unspent(r) for r in g.runs), base=lambda g: 0),
    Column("fallback_runs", None, lambda g: sum(bool(r.extra.get("select_fallback"))
                                                for r in g.runs), base=lambda g: 0),
    Column("schedule_stages_mean", None,
           lambda g: g.mean(lambda r: r.extra.get("schedule_stages", len(r.schedule))),
           base=lambda g: 0.0),
    Column("schedule_tokens_mean", None,
           lambda g: g.mean(lambda r: r.extra.get("schedule_tokens", math.nan)),
           base=lambda g: 0.0),
    Column("tokens_mean", "tokens", lambda g: g.mean(lambda r: r.tokens),
           lambda r: _count(r["tokens_mean"]), base=lambda g: 0.0),
    Column("seconds_mean", "seconds", lambda g: g.mean(lambda r: r.seconds),
           lambda r: _fmt(r["seconds_mean"], ".0f"), base=lambda g: 0.0),
    Column("wall_s_mean", None, lambda g: g.mean(lambda r: r.wall_s)),
    Column("llm_tokens_mean", "LLM tokens",
           lambda g: g.mean(lambda r: r.extra.get("llm_tokens", 0.0)),
           lambda r: _fmt(r["llm_tokens_mean"], ".0f"), base=lambda g: 0.0, optional=True),
    # Share of the LLM proposer's expansions that fell back to the skills (LLM rows only).
    Column("llm_fallback_share", "LLM fallbacks",
           lambda g: g.mean(lambda r: _cost(r, "llm_fallbacks") / _cost(r, "llm_expansions")
                            if _cost(r, "llm_expansions") > 0 else math.nan),
           lambda r: _fmt(r["llm_fallback_share"], ".0%"), base=lambda g: math.nan,
           optional=True, has_value=lambda x: _finite(x)),
    # Paid once before any run (the sb3 policy's meta-training), not per run.
    Column("meta_train_seconds", "meta-train s (real stages)",
           lambda g: g.mean(lambda r: _cost(r, "meta_train_seconds")), lambda r: _meta_cell(r),
           base=lambda g: math.nan, optional=True),
    Column("meta_train_real_stages", None,
           lambda g: g.mean(lambda r: _cost(r, "meta_train_real_stages")),
           base=lambda g: math.nan),
)
# The per-task Markdown table's column order (the CSV keeps COLUMNS' order).
MARKDOWN_ORDER = ("test_mean", "n_seeds", "vs_grid_diff", "vs_fixed_diff", "vs_skills_diff",
                  "transfer_mean",
                  "transfer_vs_grid_diff", "rel_vs_base", "dev_mean", "stages_mean",
                  "tokens_mean", "seconds_mean", "llm_tokens_mean", "llm_fallback_share",
                  "meta_train_seconds")


def _row(task: str, controller: str, group: Runs) -> dict[str, Any]:
    row: dict[str, Any] = {"task": task, "controller": controller}
    for col in COLUMNS:
        compute = col.base if controller == BASE and col.base is not None else col.compute
        row[col.key] = compute(group)
    return row


def paired_analysis(records: Sequence[RunRecord], order: Sequence[str] | None = None,
                    n_boot: int = N_BOOT) -> dict[str, Any]:
    """summary.json's "pairs", "pairs_vs_fixed" (by test item) and "transfer"."""
    ctrls = _order(records, order)
    out: dict[str, Any] = {key: pairs.compare(records, ref, ctrls, n_boot=n_boot)
                           for key, ref in REFERENCES.items()}
    out["transfer"] = pairs.transfer(records, ctrls, n_boot)
    return out


def summarize(records: Sequence[RunRecord], order: Sequence[str] | None = None,
              analysis: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per (task, controller), the base model's row first in each task.

    `analysis` (paired_analysis or analyze) is computed here when not given.
    """
    analysis = analysis if analysis is not None else paired_analysis(records, order)
    rows: list[dict[str, Any]] = []
    for task in sorted({r.task for r in records}):
        mine = [r for r in records if r.task == task]
        base_test = _nanmean([r.test_score for r in mine if r.controller == BASE])
        base_dev = _nanmean([r.base_dev_score for r in mine])
        grid_test = _nanmean([r.test_score for r in mine if r.controller == REFERENCE])
        for c in [BASE, *_order(mine, order)]:
            runs = sorted((r for r in mine if r.controller == c), key=lambda r: r.seed)
            if not runs:
                continue
            vs = {ref: analysis[key].get(task, {}).get(c) for key, ref in REFERENCES.items()}
            group = Runs(runs, base_test, base_dev, grid_test,
                         {k: v for k, v in vs.items() if v},
                         analysis["transfer"].get(task, {}).get(c, {}))
            rows.append(_row(task, c, group))
    return rows


def shown_columns(rows: Sequence[dict[str, Any]]) -> list[Column]:
    """The per-task Markdown columns, optional ones only where some row has a value."""
    by_key = {c.key: c for c in COLUMNS}
    cols = [by_key[k] for k in MARKDOWN_ORDER]
    return [c for c in cols if not c.optional or any(c.has_value(r[c.key]) for r in rows)]


def runs_rows(records: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """runs.csv: one row per run, base model included, in (task, controller, seed) order."""
    rows = []
    for r in sorted(records, key=lambda r: r.key):
        reps = pairs.replays(r)
        cache = r.extra.get("stage_cache") or {}
        rows.append({
            "task": r.task, "controller": r.controller, "seed": r.seed,
            "test_score": r.test_score, "dev_score": r.dev_score, "stages": r.stages_spent,
            "tokens": r.tokens, "seconds": r.seconds, "budget": r.budget,
            "budget_unit": r.settings.get("budget_unit", "stages" if r.controller != BASE else ""),
            "budget_tokens": r.extra.get("budget_tokens", math.nan), "wall_s": r.wall_s,
            "base_dev_score": r.base_dev_score, "test_items": len(r.test_correct),
            "transfer_test": pairs.on_transfer(r)[0],
            "transfer_seeds": " ".join(str(t.get("seed", "")) for t in reps),
            "schedule_len": len(r.schedule), "episode_stages": _episode_stages(r),
            # The returned schedule: its stages and tokens, and why its episode ended.
            "schedule_stages": r.extra.get("schedule_stages", len(r.schedule)),
            "schedule_tokens": r.extra.get("schedule_tokens", math.nan),
            "episode_end": r.extra.get("episode_end") or "",
            "select_fallback": r.extra.get("select_fallback", ""),
            "untrained_reason": r.extra.get("untrained_reason", ""),
            "unspent_reason": r.extra.get("unspent_reason", ""),
            "points_tried": " ".join(f"{p['point']}:{p['stages']}"
                                     for p in r.extra.get("points_tried", [])),
            "cache_hits": cache.get("hits", 0), "cache_misses": cache.get("misses", 0),
            "cache_seconds_saved": cache.get("seconds_saved", 0.0),
            "llm_tokens": r.extra.get("llm_tokens", 0.0),
            "stage_sources": " ".join(sorted(set(r.extra.get("stage_sources", [])))),
        })
    return rows


def unspent(rec: RunRecord) -> bool:
    """Whether a run left budget it could have spent: a stage (stages mode), or one default
    stage's tokens (tokens mode)."""
    total = rec.extra.get("budget_tokens")
    if rec.settings.get("budget_unit") == "tokens" and _finite(total):
        per = rec.extra.get("tokens_per_default_stage")
        return rec.tokens + (per if _finite(per) else 0.0) <= total
    return rec.stages_spent < rec.budget


def cost_rows(records: Sequence[RunRecord], order: Sequence[str] | None = None
              ) -> list[dict[str, Any]]:
    """Per controller over tasks and seeds: what a run spent, and why some spent less."""
    rows = []
    for c in _order(records, order):
        runs = [r for r in records if r.controller == c]
        why = Counter(str(r.extra.get("unspent_reason") or "not given") for r in runs
                      if unspent(r))
        rows.append({
            "controller": c, "runs": len(runs),
            "stages_mean": _nanmean([r.stages_spent for r in runs]),
            "budget": max(r.budget for r in runs),
            "budget_tokens": _nanmean([r.extra.get("budget_tokens", math.nan) for r in runs]),
            "unspent_runs": sum(why.values()),
            "unspent_reasons": "; ".join(f"{k}: {n}" for k, n in why.most_common()),
            "fallback_runs": sum(bool(r.extra.get("select_fallback")) for r in runs),
            "tokens_mean": _nanmean([r.tokens for r in runs]),
            "tokens_per_stage": _nanmean([r.tokens / r.stages_spent for r in runs
                                          if r.stages_spent]),
            "schedule_stages_mean": _nanmean([r.extra.get("schedule_stages", len(r.schedule))
                                              for r in runs]),
            "schedule_tokens_mean": _nanmean([r.extra.get("schedule_tokens", math.nan)
                                              for r in runs]),
            "seconds_mean": _nanmean([r.seconds for r in runs]),
            "wall_s_mean": _nanmean([r.wall_s for r in runs]),
            "llm_tokens_mean": _nanmean([r.extra.get("llm_tokens", 0.0) for r in runs]),
            "meta_train_seconds": _nanmean([_cost(r, "meta_train_seconds") for r in runs]),
        })
    return rows


def stage_cache_totals(records: Sequence[RunRecord]) -> dict[str, float]:
    """The stage cache over every run and replay: stages loaded, stages trained, wall seconds
    saved (a memoized replay, which trained nothing, counts nothing)."""
    stats = [r.extra.get("stage_cache") or {} for r in records]
    stats += [t.get("stage_cache") or {} for r in records for t in pairs.replays(r)]
    return {"hits": int(sum(x.get("hits", 0) for x in stats)),
            "misses": int(sum(x.get("misses", 0) for x in stats)),
            "seconds_saved": float(sum(x.get("seconds_saved", 0.0) for x in stats))}


def grid_design(records: Sequence[RunRecord]) -> dict[str, list[dict[str, Any]]]:
    """summary.json's "grid_design": per task, the grid's design points, in the order they run."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(records, key=lambda r: r.key):
        if r.controller == REFERENCE and "grid_design" in r.extra:
            out.setdefault(r.task, r.extra["grid_design"])
    return out


def untrained(records: Sequence[RunRecord]) -> dict[str, list[dict[str, Any]]]:
    """summary.json's "untrained": per task, each run that returned the base model (an empty
    schedule) and why (executors.untrained_reason)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(records, key=lambda r: r.key):
        if r.controller != BASE and not r.schedule:
            out.setdefault(r.task, []).append({
                "controller": r.controller, "seed": r.seed,
                "reason": r.extra.get("untrained_reason") or "no reason recorded"})
    return out


def budget_unit(records: Sequence[RunRecord]) -> str:
    """The runs' budget unit ("stages" or "tokens"; both, comma-separated, if they differ)."""
    units = sorted({str(r.settings.get("budget_unit", "stages")) for r in records
                    if r.controller != BASE})
    return ", ".join(units)


def _episode_stages(rec: RunRecord) -> float:
    """Stages in one episode of the run: extra["episode_stages"], else the env's settings."""
    n = rec.extra.get("episode_stages", rec.settings.get("env_kwargs", {}).get("stages"))
    return float(n) if _finite(n) else math.nan


def tree_full_depth(records: Sequence[RunRecord]) -> dict[str, Any]:
    """Share of tree-search runs whose chosen schedule is a whole episode long."""
    runs = [r for r in records if r.controller.startswith(TREE)]
    known = [r for r in runs if math.isfinite(_episode_stages(r))]
    full = sum(len(r.schedule) >= _episode_stages(r) for r in known)
    return {"share": full / len(known) if known else math.nan, "runs": len(known),
            "full_depth": full,
            "depths": sorted(Counter(len(r.schedule) for r in known).items())}


def smoke_reason(records: Sequence[RunRecord], conclusions: bool = True) -> str:
    """Why these runs are a smoke test and not evidence ("" when they are not one)."""
    runs = [r for r in records if r.controller != BASE]
    if not conclusions:
        return "the harness ran a smoke preset"
    if runs and max(r.budget for r in runs) <= SMOKE_BUDGET:
        return f"a budget of {max(r.budget for r in runs)} stages (smoke presets have <= 6)"
    if len(pairs.seeds_of(runs)) < 2:
        return "one seed: no CI and no verdict"
    return ""


def analyze(records: Sequence[RunRecord], order: Sequence[str] | None = None,
            n_boot: int = N_BOOT, conclusions: bool = True,
            n_null: int = structure.N_NULL) -> dict[str, Any]:
    """Everything summary.json holds (NaN where a value is not defined)."""
    ctrls = _order(records, order)
    depth = tree_full_depth(records)
    return {
        "seeds": pairs.seeds_of(records),
        "tasks": sorted({r.task for r in records}),
        "controllers": [BASE, *ctrls],
        "smoke": smoke_reason(records, conclusions),
        "budget_unit": budget_unit(records),
        "select_rule": SELECT_RULE,
        "select_rule_text": SELECT_RULE_TEXT,
        "grid_design": grid_design(records),
        "stage_cache": stage_cache_totals(records),
        "untrained": untrained(records),
        "level": pairs.LEVEL, "n_boot": n_boot,
        **paired_analysis(records, order, n_boot),
        "tree_full_depth_share": depth["share"],
        "tree_full_depth": depth,
        "iqm": pairs.across_tasks(records, ctrls, n_boot),
        "structure": structure.summarize(records, n_null),
        "cost": {row["controller"]: row for row in cost_rows(records, ctrls)},
        "profile_normalization": plots.PROFILE_NORMALIZATION,
    }


# ---- formatting ----------------------------------------------------------------------------------


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and math.isfinite(x)


def _fmt(x: float, spec: str = ".3f") -> str:
    return format(x, spec) if _finite(x) else "n/a"


def _pct(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{100 * x:+.1f}%"


def _p(x: float) -> str:
    return "n/a" if not _finite(x) else "<0.001" if x < 0.001 else f"{x:.3f}"


def _count(x: float) -> str:
    if not _finite(x):
        return "n/a"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= div:
            return f"{x / div:.1f}{unit}"
    return f"{x:.0f}"


def _est(e: dict[str, Any], spec: str = ".3f") -> str:
    if not _finite(e["point"]):
        return "n/a"
    lo, hi = e["ci"]
    ci = f" [{_fmt(lo, spec)}, {_fmt(hi, spec)}]" if _finite(lo) else ""
    return _fmt(e["point"], spec) + ci


def jsonable(x: Any) -> Any:
    """Plain JSON: NaN and infinities become null, numpy scalars and tuples plain values."""
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        if not rows:
            return
        w = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
        w.writeheader()
        w.writerows(rows)


def _meta_cell(row: dict[str, Any]) -> str:
    if not _finite(row["meta_train_seconds"]):
        return "—"
    return f"{row['meta_train_seconds']:.0f} ({_fmt(row['meta_train_real_stages'], '.0f')})"


# ---- Markdown ------------------------------------------------------------------------------------


def _by_task_and_controller(rows: Sequence[dict[str, Any]]
                            ) -> tuple[list[str], list[str], dict[tuple[str, str], dict[str, Any]]]:
    """The tasks (sorted), the controllers (in row order) and each (task, controller)'s row."""
    return (sorted({r["task"] for r in rows}), list(dict.fromkeys(r["controller"] for r in rows)),
            {(r["task"], r["controller"]): r for r in rows})


def overview(rows: Sequence[dict[str, Any]], iqm: dict[str, dict[str, Any]] | None = None
             ) -> list[str]:
    """All tasks in one table: each controller's mean test score per task, with its 95% CI over
    seeds where there are several (else its change over the base model), and the IQM over tasks
    x seeds when `iqm` is given."""
    tasks, ctrls, cell = _by_task_and_controller(rows)
    iqm_header = " IQM [95% CI] |" if iqm else ""
    lines = ["| controller | " + " | ".join(tasks) + f" |{iqm_header} stages | seconds |",
             "|---" * (len(tasks) + 3 + bool(iqm)) + "|"]

    def score(task: str, ctrl: str) -> str:
        if (task, ctrl) not in cell:
            return "—"
        row = cell[task, ctrl]
        if _finite(row["test_ci_low"]):
            return (f"{_fmt(row['test_mean'])} [{_fmt(row['test_ci_low'])}, "
                    f"{_fmt(row['test_ci_high'])}]")
        change = "" if ctrl == BASE else f" ({_pct(row['rel_vs_base'])})"
        return _fmt(row["test_mean"]) + change

    for c in ctrls:
        mine = [cell[t, c] for t in tasks if (t, c) in cell]
        agg = f" {_est(iqm[c]['test'])} |" if iqm and c in iqm else (" — |" if iqm else "")
        lines.append(f"| {c} | " + " | ".join(score(t, c) for t in tasks) + f" |{agg}"
                     + f" {_fmt(_nanmean([r['stages_mean'] for r in mine]), '.1f')}"
                     + f" | {_fmt(_nanmean([r['seconds_mean'] for r in mine]), '.0f')} |")
    return lines


def pairs_overview(rows: Sequence[dict[str, Any]], key: str,
                   iqm: dict[str, dict[str, Any]] | None = None) -> list[str]:
    """All tasks in one table: each controller's paired difference from one reference (`key`:
    vs_grid or vs_fixed) per task, its CI and verdict, and the IQM of the difference."""
    tasks, ctrls, cell = _by_task_and_controller(rows)
    lines = ["| controller | " + " | ".join(tasks) + (" | IQM |" if iqm else " |"),
             "|---" * (len(tasks) + 1 + bool(iqm)) + "|"]
    for c in (c for c in ctrls if c != BASE):
        cells = [_diff_cell(cell[t, c], key) if (t, c) in cell else "—" for t in tasks]
        if iqm:
            own = all(cell[t, c][f"{key}_verdict"] == "reference" for t in tasks if (t, c) in cell)
            cells.append("—" if own or c not in iqm else _est(iqm[c][f"diff_{key}"], "+.3f"))
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return lines


def iqm_table(iqm: dict[str, dict[str, Any]]) -> list[str]:
    refs = list(REFERENCES.values())
    lines = ["| controller | tasks x seeds | IQM test [95% CI] | "
             + " | ".join(f"IQM test − {r} | P(> {r})" for r in refs) + " |",
             "|---" * (3 + 2 * len(refs)) + "|"]
    for c, e in iqm.items():
        cells = [f"{_est(e[f'diff_vs_{r}'], '+.3f')} | {_est(e[f'poi_vs_{r}'], '.2f')}"
                 for r in refs]
        lines.append(f"| {c} | {len(e['tasks'])} x {e['n_seeds']} | {_est(e['test'])} | "
                     + " | ".join(cells) + " |")
    return lines


def structure_table(struct: dict[str, Any]) -> list[str]:
    """Each group with a long enough schedule against its null; the others in one line."""
    lines = ["| schedules | class | statistic | observed | random: mean [95%] | p "
             "| stages shuffled: mean [95%] | p |", "|---" * 8 + "|"]
    empty = []
    for g, entry in struct["groups"].items():
        of = f"{entry['schedules']} of {entry['schedules'] + entry['excluded_short']}"
        if not entry["schedules"]:
            empty.append(f"{g} ({of})")
            continue
        who = f"{g}: {of} ({', '.join(entry['controllers'])})"
        for kind in struct["classes"]:
            for stat in structure.STATISTICS:
                s = entry[kind][stat]
                cells = [f"{_fmt(s[f'{n}null_mean'])} [{_fmt(s[f'{n}null_ci'][0])}, "
                         f"{_fmt(s[f'{n}null_ci'][1])}] | {_p(s[f'{n}p_value'])}"
                         for n in ("", "shuffled_")]
                lines.append(f"| {who} | {kind} | {stat} | {_fmt(s['value'])} | "
                             + " | ".join(cells) + " |")
    table = lines if len(lines) > 2 else []  # a header alone is no table
    note = [f"No chosen schedule of at least {struct['min_stages']} stages: "
            + "; ".join(empty) + "."] if empty else []
    return table + ([""] if table and note else []) + note


def cost_table(cost: dict[str, dict[str, Any]]) -> list[str]:
    """Per controller: the budget in its unit, what was spent, the returned schedule's size."""
    lines = ["| controller | tokens / budget | stages / planned | runs under budget (why) "
             "| tokens / stage | returned schedule: stages, tokens | selection fallbacks "
             "| env seconds | wall seconds | LLM tokens | meta-train s |", "|---" * 11 + "|"]
    for c, r in cost.items():
        why = f" ({r['unspent_reasons']})" if r["unspent_runs"] else ""
        lines.append(f"| {c} | {_count(r['tokens_mean'])} / {_count(r['budget_tokens'])} "
                     f"| {_fmt(r['stages_mean'], '.1f')} / {r['budget']} "
                     f"| {r['unspent_runs']} of {r['runs']}{why} "
                     f"| {_count(r['tokens_per_stage'])} "
                     f"| {_fmt(r['schedule_stages_mean'], '.1f')}, "
                     f"{_count(r['schedule_tokens_mean'])} "
                     f"| {r['fallback_runs']} of {r['runs']} | {_fmt(r['seconds_mean'], '.0f')} "
                     f"| {_fmt(r['wall_s_mean'], '.0f')} | {_fmt(r['llm_tokens_mean'], '.0f')} "
                     f"| {_fmt(r['meta_train_seconds'], '.0f')} |")
    return lines


METHODS = (
    "*vs grid* / *vs fixed* / *vs skills*: mean over seeds of the paired test-score difference "
    "(controller − reference, same seed), its 95% bootstrap CI over seeds and test items, and the "
    "verdict, which needs two tests to agree: *better* when both the bootstrap CI and the 95% "
    "t-interval over seeds lie above 0, *worse* when both lie below, else *no difference*. "
    "summary.json adds the t-interval (t_ci), both p-values Holm-adjusted across tasks (p_holm, "
    "p_t_holm; verdict_holm: the verdict at 95% family-wise, shown beside the verdict where they "
    "differ), the exact sign-flip p over seeds (p_sign_flip; at 10 seeds it cannot go below "
    "0.002) and the probability of improvement (poi). llmzero − skills is the ablation: the tree "
    "search proposes the skills' moves, so it asks whether the search pays beyond them. The base "
    "model is scored once (its greedy test score does not depend on the seed) and pairs with "
    "every seed. *transfer*: the chosen schedule retrained from the base on fresh seeds, under "
    "the same episode token cap, mean test score. *tokens*: prompt + completion tokens sampled "
    "per run (each trained once at num_iterations = 1); *seconds*: the env's training and "
    "evaluation seconds per run.")


# Each paired table's key in the rows and its reference.
PAIR_KEYS = (("vs_grid", REFERENCES["pairs"]), ("vs_fixed", REFERENCES["pairs_vs_fixed"]),
             ("vs_skills", REFERENCES["pairs_vs_skills"]))
ABLATION = (" The llmzero row is the ablation: the tree search proposes the skills' moves, so "
            "llmzero − skills is what the search pays beyond them.")
# The head tables (overview and paired differences) open with this caption and end before METHODS,
# found by its opening words (the same in reports written before the skills table joined).
HEAD_CAPTION = "Test score per task"
METHODS_START = "*vs grid* / *vs fixed*"


def head_tables(report: str) -> str:
    """The head tables of a written leaderboard.md, their captions included: what the README
    shows of a run (benchmarks/readme.py copies them, so they are never retyped)."""
    start, end = report.find(f"\n{HEAD_CAPTION}"), report.find(f"\n{METHODS_START}")
    if start < 0 or end < start:
        raise ValueError(f"no head tables (from {HEAD_CAPTION!r} to the methods note): not a "
                         "leaderboard.md written by benchmarks.leaderboard.report")
    return report[start + 1 : end].strip()


def _cache_line(cache: dict[str, float]) -> str:
    if not cache["hits"] and not cache["misses"]:
        return "Stage cache: not used."
    return (f"Stage cache: {cache['hits']} stages loaded (hits) and {cache['misses']} trained "
            f"(misses) over every run and replay; {cache['seconds_saved']:.0f} s of wall time "
            "saved. A loaded stage is charged to the budget as trained.")


def _untrained_lines(runs: list[dict[str, Any]]) -> list[str]:
    """One line per run that returned the base model, with its reason."""
    if not runs:
        return []
    return ["Runs that returned the base model (kept nothing they trained), and why:", "",
            *[f"- {r['controller']}, seed {r['seed']}: {r['reason']}." for r in runs], ""]


def _smoke_lines(reason: str) -> list[str]:
    if not reason:
        return []
    return [f"> **Smoke run, not for conclusions**: {reason}. It checks that the pipeline "
            "runs; its rankings, CIs and verdicts support no claim.", ""]


def markdown(rows: Sequence[dict[str, Any]], analysis: dict[str, Any] | None = None,
             plots_by_task: dict[str, list[str]] | None = None, header: str = "",
             smoke: str = "") -> str:
    """The leaderboard as Markdown: the warning, command, overview, per-task head tables with
    paired differences, the across-task IQM, the structure against its null, the cost."""
    shown = plots_by_task or {}
    lines = ["# LLMZero-Gym leaderboard", "", *_smoke_lines(smoke)]
    if header:
        lines += [header, ""]
    if analysis is not None:
        lines += [f"Seeds: {analysis['seeds']}; tasks: {', '.join(analysis['tasks'])}; budget "
                  f"unit: {analysis['budget_unit'] or 'n/a'}.", "",
                  f"Selection rule, one for every controller (applied by the Tracker; "
                  f"select_rule in summary.json): {analysis['select_rule_text']}.", "",
                  _cache_line(analysis["stage_cache"]), ""]
    iqm = analysis["iqm"] if analysis is not None else None
    many_seeds = any(_finite(r["test_ci_low"]) for r in rows)
    lines += [f"{HEAD_CAPTION}: mean over seeds "
              + ("[95% CI over seeds]" if many_seeds else "(change over the base model)")
              + (", and the IQM over tasks x seeds" if iqm else "")
              + "; stages and seconds per run, mean over tasks and seeds.", "",
              *overview(rows, iqm), ""]
    for key, ref in PAIR_KEYS:
        if many_seeds and any(r["controller"] == ref for r in rows):
            lines += [f"Paired test-score difference from {ref} (same seed): mean [95% CI], "
                      "verdict; a verdict that Holm's correction across tasks changes is "
                      f"shown beside it.{ABLATION if ref == 'skills' else ''}", "",
                      *pairs_overview(rows, key, iqm), ""]
    lines += [METHODS, ""]
    cols = shown_columns(rows)
    for task in sorted({r["task"] for r in rows}):
        lines += [f"## {task}", "",
                  "| controller | " + " | ".join(c.header for c in cols) + " |",
                  "|---" * (1 + len(cols)) + "|"]
        for r in (r for r in rows if r["task"] == task):
            lines.append(f"| {r['controller']} | " + " | ".join(c.cell(r) for c in cols) + " |")
        lines.append("")
        if analysis is not None:
            lines += _untrained_lines(analysis["untrained"].get(task, []))
        for p in shown.get(task, []):
            lines += [f"![{Path(p).stem}]({p})", ""]
    if analysis is not None:
        lines += _analysis_sections(analysis)
    for p in shown.get("", []):
        lines += [f"![{Path(p).stem}]({p})", ""]
    return "\n".join(lines)


def _analysis_sections(a: dict[str, Any]) -> list[str]:
    depth = a["tree_full_depth"]
    struct = a["structure"]
    lines = ["## Across tasks", "",
             "Interquartile mean over tasks x seeds with stratified bootstrap 95% CIs (seeds "
             "resampled within each task), of the test score and of the paired difference; "
             "P(> ref): the probability that the controller beats the reference on a seed, "
             "averaged over tasks.", "", *iqm_table(a["iqm"]), ""]
    if depth["runs"]:
        lines += [f"Tree search reaching the episode's full length: "
                  f"{depth['full_depth']} of {depth['runs']} runs "
                  f"({_fmt(depth['share'], '.0%')}); chosen depths (depth, runs): "
                  f"{depth['depths']}.", ""]
    lines += ["## Schedule structure against its null", "",
              f"Chosen schedules of at least {struct['min_stages']} stages. *p_increase*: "
              "P(increase | change) of a class's parameters; *direction_changes_per_stage*: "
              "turning points per stage. Two nulls, each the same number of schedules of the "
              f"same lengths: *random*, {struct['null']} (grids from {struct['grids_from']}); "
              "*stages shuffled*, each chosen schedule with its stages in a random order (its "
              f"values kept, their order tested). {struct['n_null']} draws each; p: two-sided "
              "empirical.", "", *structure_table(struct), "",
              "## Cost", "",
              "Means per run. *tokens / budget*: tokens sampled over the token budget (n/a under "
              "a budget in stages); *stages / planned*: stages trained over the budget in stages "
              "(under a token budget, the stages it buys at one default stage's tokens); *runs "
              "under budget*: runs that left a stage's worth of it; *returned schedule*: the "
              "chosen state's stages and tokens from the base; *selection fallbacks*: runs in "
              "which no episode ended, so the rule took the best state at any depth.", "",
              *cost_table(a["cost"]), ""]
    return lines


# ---- everything ----------------------------------------------------------------------------------


def write_report(out_dir: Path, records: Sequence[RunRecord], header: str = "",
                 order: Sequence[str] | None = None, conclusions: bool = True,
                 n_boot: int = N_BOOT) -> dict[str, Path]:
    """Write runs.csv, summary.json, leaderboard.md, leaderboard.csv, structure.csv and plots/.

    conclusions=False marks a smoke preset; the report also calls a run a smoke run when its
    budget is at most SMOKE_BUDGET stages or it has one seed. A smoke run says so in the
    Markdown and on stdout.
    """
    out_dir = Path(out_dir)
    plot_dir = out_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    analysis = analyze(records, order, n_boot, conclusions)
    ctrls = _order(records, order)
    rows = summarize(records, order, analysis)
    shown: dict[str, list[str]] = {}
    for task in analysis["tasks"]:
        a, s = plot_dir / f"anytime_{task}.png", plot_dir / f"schedule_{task}.png"
        plots.plot_anytime(a, task, records, order, n_boot)
        plots.plot_schedules(s, task, records, order, n_boot)
        shown[task] = [str(a.relative_to(out_dir)), str(s.relative_to(out_dir))]
    figures = {"differences": lambda p: plots.plot_differences(p, analysis, ctrls),
               "iqm": lambda p: plots.plot_iqm(p, analysis["iqm"], ctrls),
               "profile": lambda p: plots.plot_profile(p, records, ctrls, n_boot),
               "structure": lambda p: plots.plot_structure(p, analysis["structure"])}
    for name, draw in figures.items():
        draw(plot_dir / f"{name}.png")
    shown[""] = [f"plots/{name}.png" for name in figures]
    write_csv(out_dir / "runs.csv", runs_rows(records))
    write_csv(out_dir / "leaderboard.csv", rows)
    write_csv(out_dir / "structure.csv", structure.schedule_rows(records))
    (out_dir / "summary.json").write_text(json.dumps(jsonable(analysis), indent=1) + "\n")
    (out_dir / "leaderboard.md").write_text(
        markdown(rows, analysis, shown, header, analysis["smoke"]))
    if analysis["smoke"]:
        print(f"note: smoke run, not for conclusions ({analysis['smoke']})", flush=True)
    return {"md": out_dir / "leaderboard.md", "csv": out_dir / "leaderboard.csv",
            "runs": out_dir / "runs.csv", "summary": out_dir / "summary.json",
            "structure": out_dir / "structure.csv", "plots": plot_dir}


def main() -> None:
    p = argparse.ArgumentParser(description="Rebuild the leaderboard report from leaderboard.h5.")
    p.add_argument("out", nargs="?", default="results", help="folder holding leaderboard.h5")
    a = p.parse_args()
    path = Path(a.out) / COMBINED
    try:
        records = read_combined(path)
    except UnreadableRunLog as err:
        raise SystemExit(f"{err}. Rerun the leaderboard command that made it: it rebuilds "
                         f"{COMBINED} from {Path(a.out) / RUNS_DIR}/ and the report with "
                         "it.") from None
    with h5py.File(path, "r") as f:
        header = str(f.attrs.get("header", ""))
        order = json.loads(f.attrs.get("order", "[]"))
    paths = write_report(Path(a.out), records, header=header, order=order)
    print(f"report={paths['md']} runs={len(records)}")


if __name__ == "__main__":
    main()
