"""The leaderboard's report: tables (md, csv), plots, and the paper's schedule-structure statistic.

Everything here is computed from RunRecords (``runlog``), so a report can be rebuilt from
``leaderboard.h5`` alone: ``python -m benchmarks.leaderboard.report results/``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import h5py  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from benchmarks.leaderboard.runlog import BASE, COMBINED, RunRecord, read_combined  # noqa: E402

# The paper's split of the hyperparameters: capacity accumulates, regularization oscillates.
CAPACITY = ("max_completion_length", "num_generations")
REGULARIZATION = ("learning_rate", "beta", "epsilon", "temperature")
REFERENCE = "grid"  # the second of the paper's two figures is relative to grid search


# ---- statistics ---------------------------------------------------------------------------------


def bootstrap_ci(values: Sequence[float], level: float = 0.95, n_boot: int = 10_000,
                 seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): percentile bootstrap CI of the mean, seeded so tables are stable."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_boot, x.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(x.mean()), float(lo), float(hi)


def nondecreasing_fraction(values: Sequence[float]) -> float:
    """Fraction of stage transitions that keep or raise the value; NaN with fewer than 2 stages."""
    d = np.diff(np.asarray(values, dtype=np.float64))
    return float(np.mean(d >= 0)) if d.size else math.nan


def direction_changes(values: Sequence[float]) -> int:
    """How often the value turns around (up then down, or down then up); flat runs don't count."""
    d = np.diff(np.asarray(values, dtype=np.float64))
    signs = np.sign(d[d != 0])
    return int(np.sum(signs[1:] != signs[:-1]))


def schedule_structure(schedule: Sequence[dict[str, Any]]) -> dict[str, float]:
    """The structural statistic of one chosen schedule, for each parameter it holds numerically."""
    out: dict[str, float] = {}
    for name in CAPACITY + REGULARIZATION:
        values = [hp.get(name) for hp in schedule]
        if not values or not all(isinstance(v, (int, float)) and v is not None for v in values):
            continue
        if name in CAPACITY:
            out[name] = nondecreasing_fraction(values)
        else:
            out[name] = float(direction_changes(values))
    return out


def relative(x: float, ref: float) -> float:
    """Relative improvement (x - ref) / ref; NaN where the reference is 0 or missing."""
    if not math.isfinite(ref) or ref == 0 or not math.isfinite(x):
        return math.nan
    return (x - ref) / abs(ref)


# ---- tables --------------------------------------------------------------------------------------


def _nanmean(values: Sequence[float]) -> float:
    v = [x for x in values if isinstance(x, (int, float)) and math.isfinite(x)]
    return float(np.mean(v)) if v else math.nan


def _order(records: Sequence[RunRecord], order: Sequence[str] | None) -> list[str]:
    """Controllers in the given order, then any others alphabetically; never the base."""
    present = {r.controller for r in records} - {BASE}
    first = [c for c in (order or []) if c in present]
    return first + sorted(present - set(first))


def _cost(record: RunRecord, key: str) -> float:
    value = record.extra.get("cost", {}).get(key)
    return float(value) if isinstance(value, (int, float)) else math.nan


@dataclass(frozen=True)
class Runs:
    """The runs of one (task, controller) and what their columns are measured against."""

    runs: list[RunRecord]  # sorted by seed; the base row holds the base records
    base_test: float
    base_dev: float
    grid_test: float  # the reference's mean test score (NaN without a grid row)

    @cached_property
    def test_ci(self) -> tuple[float, float, float]:
        """(mean, low, high) of the test score over seeds; bootstrapped once per group."""
        return bootstrap_ci([r.test_score for r in self.runs])

    def mean(self, value: Callable[[RunRecord], float]) -> float:
        return _nanmean([value(r) for r in self.runs])

    def structure(self, kind: tuple[str, ...]) -> float:
        return _nanmean([v for r in self.runs for k, v in schedule_structure(r.schedule).items()
                         if k in kind])


@dataclass(frozen=True)
class Column:
    """One report column: a CSV field and, when `header` is set, a per-task Markdown column.

    `compute` measures a (task, controller) group; `base` overrides it on the base model's row;
    `cell` writes the Markdown cell from the whole row; an `optional` column is shown only when
    some row `has_value` (by default a finite, non-zero one).
    """

    key: str
    header: str | None
    compute: Callable[[Runs], float]
    cell: Callable[[dict[str, Any]], str] | None = None
    base: Callable[[Runs], float] | None = None
    optional: bool = False
    has_value: Callable[[Any], bool] = lambda x: _finite(x) and x != 0


def _is_base(row: dict[str, Any]) -> bool:
    return row["controller"] == BASE


COLUMNS: tuple[Column, ...] = (
    Column("n_seeds", "seeds", lambda g: len(g.runs), lambda r: str(r["n_seeds"])),
    Column("test_mean", "test [95% CI]", lambda g: g.test_ci[0],
           lambda r: _fmt(r["test_mean"]) if _is_base(r) else
           f"{_fmt(r['test_mean'])} [{_fmt(r['test_ci_low'])}, {_fmt(r['test_ci_high'])}]"),
    Column("test_ci_low", None, lambda g: g.test_ci[1]),
    Column("test_ci_high", None, lambda g: g.test_ci[2]),
    Column("rel_vs_base", "vs base", lambda g: relative(g.test_ci[0], g.base_test),
           lambda r: "—" if _is_base(r) else _pct(r["rel_vs_base"]), base=lambda g: 0.0),
    Column("rel_vs_grid", "vs grid", lambda g: relative(g.test_ci[0], g.grid_test),
           lambda r: _pct(r["rel_vs_grid"])),
    Column("dev_mean", "dev", lambda g: g.mean(lambda r: r.dev_score),
           lambda r: _fmt(r["dev_mean"]), base=lambda g: g.base_dev),
    Column("budget", None, lambda g: max(r.budget for r in g.runs), base=lambda g: 0),
    Column("stages_mean", "stages", lambda g: g.mean(lambda r: r.stages_spent),
           lambda r: _fmt(r["stages_mean"], ".1f"), base=lambda g: 0.0),
    Column("seconds_mean", "seconds", lambda g: g.mean(lambda r: r.wall_s),
           lambda r: _fmt(r["seconds_mean"], ".0f"), base=lambda g: 0.0),
    Column("tokens_mean", None, lambda g: g.mean(lambda r: r.tokens), base=lambda g: 0.0),
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
    Column("capacity_nondecreasing", "cap.", lambda g: g.structure(CAPACITY),
           lambda r: _fmt(r["capacity_nondecreasing"], ".2f"), base=lambda g: math.nan),
    Column("regularization_direction_changes", "reg.", lambda g: g.structure(REGULARIZATION),
           lambda r: _fmt(r["regularization_direction_changes"], ".1f"),
           base=lambda g: math.nan),
)
# The per-task Markdown table's column order (the CSV keeps COLUMNS' order).
MARKDOWN_ORDER = ("test_mean", "n_seeds", "rel_vs_base", "rel_vs_grid", "dev_mean",
                  "stages_mean", "seconds_mean", "capacity_nondecreasing",
                  "regularization_direction_changes", "llm_tokens_mean", "llm_fallback_share",
                  "meta_train_seconds")


def _row(task: str, controller: str, group: Runs) -> dict[str, Any]:
    row: dict[str, Any] = {"task": task, "controller": controller}
    for col in COLUMNS:
        compute = col.base if controller == BASE and col.base is not None else col.compute
        row[col.key] = compute(group)
    return row


def summarize(records: Sequence[RunRecord],
              order: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per (task, controller), the base model's row first in each task."""
    rows: list[dict[str, Any]] = []
    for task in sorted({r.task for r in records}):
        mine = [r for r in records if r.task == task]
        base_test = _nanmean([r.test_score for r in mine if r.controller == BASE])
        base_dev = _nanmean([r.base_dev_score for r in mine])
        grid_test = _nanmean([r.test_score for r in mine if r.controller == REFERENCE])
        for c in [BASE, *_order(mine, order)]:
            runs = sorted((r for r in mine if r.controller == c), key=lambda r: r.seed)
            rows.append(_row(task, c, Runs(runs, base_test, base_dev, grid_test)))
    return rows


def shown_columns(rows: Sequence[dict[str, Any]]) -> list[Column]:
    """The per-task Markdown columns, optional ones only where some row has a value."""
    by_key = {c.key: c for c in COLUMNS}
    cols = [by_key[k] for k in MARKDOWN_ORDER]
    return [c for c in cols if not c.optional or any(c.has_value(r[c.key]) for r in rows)]


def structure_rows(records: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """One row per (task, controller, seed, parameter) of each chosen schedule."""
    rows = []
    for r in sorted(records, key=lambda r: r.key):
        if r.controller == BASE:
            continue
        for name, value in schedule_structure(r.schedule).items():
            kind = "capacity" if name in CAPACITY else "regularization"
            stat = "nondecreasing_fraction" if kind == "capacity" else "direction_changes"
            rows.append({"task": r.task, "controller": r.controller, "seed": r.seed,
                         "param": name, "kind": kind, "statistic": stat, "value": value,
                         "stages": len(r.schedule)})
    return rows


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _fmt(x: float, spec: str = ".3f") -> str:
    return format(x, spec) if _finite(x) else "n/a"


def _pct(x: float) -> str:
    return "n/a" if not math.isfinite(x) else f"{100 * x:+.1f}%"


def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        if not rows:
            return
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _meta_cell(row: dict[str, Any]) -> str:
    if not math.isfinite(row["meta_train_seconds"]):
        return "—"
    return f"{row['meta_train_seconds']:.0f} ({_fmt(row['meta_train_real_stages'], '.0f')})"


def overview(rows: Sequence[dict[str, Any]]) -> list[str]:
    """All tasks in one table: each controller's mean test score (change over base) per task."""
    tasks = sorted({r["task"] for r in rows})
    ctrls = list(dict.fromkeys(r["controller"] for r in rows))
    cell = {(r["task"], r["controller"]): r for r in rows}
    lines = ["| controller | " + " | ".join(tasks) + " | stages | seconds |",
             "|---" * (len(tasks) + 3) + "|"]

    def score(task: str, ctrl: str) -> str:
        if (task, ctrl) not in cell:
            return "—"
        row = cell[task, ctrl]
        change = "" if ctrl == BASE else f" ({_pct(row['rel_vs_base'])})"
        return _fmt(row["test_mean"]) + change

    for c in ctrls:
        mine = [cell[t, c] for t in tasks if (t, c) in cell]
        lines.append(f"| {c} | " + " | ".join(score(t, c) for t in tasks)
                     + f" | {_fmt(_nanmean([r['stages_mean'] for r in mine]), '.1f')}"
                     + f" | {_fmt(_nanmean([r['seconds_mean'] for r in mine]), '.0f')} |")
    return lines


def markdown(rows: Sequence[dict[str, Any]], struct: Sequence[dict[str, Any]],
             plots: dict[str, list[str]], header: str = "") -> str:
    """The leaderboard as Markdown: all tasks at a glance, one table per task, the structure."""
    lines = ["# LLMZero-Gym leaderboard", ""]
    if header:
        lines += [header, ""]
    lines += ["Test score per task (change over the base model); stages and seconds per run, "
              "mean over tasks and seeds.", "", *overview(rows), ""]
    lines += [
        "Test score of the state each controller chose on dev (mean over seeds, 95% bootstrap CI); "
        "relative improvement over the base model and over grid search (the paper's two figures); "
        "stages and wall seconds spent per run. *cap.* = fraction of stage transitions where the "
        "capacity parameters (max_completion_length, num_generations) do not decrease; *reg.* = "
        "direction changes of the regularization parameters (learning_rate, beta, epsilon, "
        "temperature), mean over parameters and seeds.", ""]
    cols = shown_columns(rows)
    for task in sorted({r["task"] for r in rows}):
        lines += [f"## {task}", "",
                  "| controller | " + " | ".join(c.header for c in cols) + " |",
                  "|---" * (1 + len(cols)) + "|"]
        for r in (r for r in rows if r["task"] == task):
            lines.append(f"| {r['controller']} | " + " | ".join(c.cell(r) for c in cols) + " |")
        lines.append("")
        for p in plots.get(task, []):
            lines += [f"![{Path(p).stem}]({p})", ""]
    if struct:
        lines += ["## Schedule structure (each chosen schedule)", "",
                  "Capacity parameters: fraction of transitions that do not decrease. "
                  "Regularization parameters: number of direction changes.", "",
                  "| task | controller | seed | stages | " + " | ".join(CAPACITY + REGULARIZATION)
                  + " |", "|---" * (4 + len(CAPACITY + REGULARIZATION)) + "|"]
        keys = sorted({(s["task"], s["controller"], s["seed"], s["stages"]) for s in struct})
        for task, ctrl, seed, n in keys:
            vals = {s["param"]: s["value"] for s in struct
                    if (s["task"], s["controller"], s["seed"]) == (task, ctrl, seed)}
            cells = [_fmt(vals.get(p, math.nan), ".2f" if p in CAPACITY else ".0f")
                     for p in CAPACITY + REGULARIZATION]
            lines.append(f"| {task} | {ctrl} | {seed} | {n} | " + " | ".join(cells) + " |")
        lines.append("")
    for p in plots.get("", []):
        lines += [f"![{Path(p).stem}]({p})", ""]
    return "\n".join(lines)


# ---- plots ---------------------------------------------------------------------------------------


def _anytime_matrix(runs: Sequence[RunRecord], horizon: int) -> np.ndarray:
    """Best dev after k = 0..horizon stages for each run, carried forward past its last stage."""
    out = np.full((len(runs), horizon + 1), np.nan)
    for i, r in enumerate(runs):
        curve = sorted(r.anytime) or [(0, r.base_dev_score)]
        for k in range(horizon + 1):
            seen = [b for s, b in curve if s <= k]
            out[i, k] = max(seen) if seen else r.base_dev_score
    return out


def plot_anytime(path: Path, task: str, records: Sequence[RunRecord],
                 order: Sequence[str] | None = None) -> None:
    """Best dev score vs stages spent, one line per controller (mean over seeds, min-max band)."""
    runs = [r for r in records if r.task == task and r.controller != BASE]
    horizon = max([r.budget for r in runs] + [1])
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    x = np.arange(horizon + 1)
    for c in _order(runs, order):
        m = _anytime_matrix([r for r in runs if r.controller == c], horizon)
        (line,) = ax.plot(x, m.mean(axis=0), marker="o", ms=3, label=c)
        if len(m) > 1:
            ax.fill_between(x, m.min(axis=0), m.max(axis=0), alpha=0.15, color=line.get_color())
    base = _nanmean([r.base_dev_score for r in records if r.task == task])
    if math.isfinite(base):
        ax.axhline(base, color="gray", ls="--", lw=1, label="base")
    ax.set(xlabel="stages spent", ylabel="best dev score", title=f"{task}: anytime performance")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_schedules(path: Path, task: str, records: Sequence[RunRecord],
                   order: Sequence[str] | None = None) -> None:
    """Hyperparameter trajectory of each controller's chosen schedule (first seed)."""
    mine = [r for r in records if r.task == task and r.controller != BASE]
    runs = {c: min((r for r in mine if r.controller == c), key=lambda r: r.seed)
            for c in _order(mine, order)}
    names = [n for n in CAPACITY + REGULARIZATION
             if any(r.schedule and n in r.schedule[0] for r in runs.values())]
    names = names or [""]
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        values = [v for r in runs.values() for hp in r.schedule
                  if isinstance(v := hp.get(name), (int, float))]
        span = (max(values) - min(values)) or 1.0 if values else 1.0
        for i, (c, r) in enumerate(runs.items()):
            ys = np.asarray([hp.get(name, math.nan) for hp in r.schedule], dtype=float)
            if not ys.size:
                continue
            # A small vertical offset per controller keeps identical schedules visible.
            shift = 0.012 * (i - (len(runs) - 1) / 2)
            ys = ys * (1 + 3 * shift) if name == "learning_rate" else ys + shift * span
            # Stage k holds its value from k-1 to k stages trained.
            line = ax.stairs(ys, np.arange(len(ys) + 1), baseline=None, label=c, lw=1.5)
            ax.plot(np.arange(len(ys)) + 0.5, ys, "o", ms=3, color=line.get_edgecolor())
        if name == "learning_rate":
            ax.set_yscale("log")
        kind = "capacity" if name in CAPACITY else "regularization"
        ax.set(title=f"{name} ({kind})" if name else "no schedules", xlabel="stages trained")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=7)
    seed = min((r.seed for r in runs.values()), default=0)
    fig.suptitle(f"{task}: chosen schedules (seed {seed})")
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_improvement(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """The paper's two figures: relative test improvement over the base model and over grid."""
    tasks = sorted({r["task"] for r in rows})
    ctrls = list(dict.fromkeys(r["controller"] for r in rows if r["controller"] != BASE))
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / max(len(ctrls), 1)
    for ax, key, title in ((axes[0], "rel_vs_base", "over the base model"),
                           (axes[1], "rel_vs_grid", "over grid search")):
        for j, c in enumerate(ctrls):
            vals = [next((100 * r[key] for r in rows if r["task"] == t and r["controller"] == c),
                         math.nan) for t in tasks]
            ax.bar(np.arange(len(tasks)) + (j - (len(ctrls) - 1) / 2) * width,
                   np.nan_to_num(vals), width, label=c)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(np.arange(len(tasks)), tasks)
        ax.set(ylabel="relative test improvement (%)", title=f"Improvement {title}")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(9, max(len(labels), 1)), fontsize=7)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- everything ----------------------------------------------------------------------------------


def write_report(out_dir: Path, records: Sequence[RunRecord], header: str = "",
                 order: Sequence[str] | None = None) -> dict[str, Path]:
    """Write leaderboard.md, leaderboard.csv, structure.csv and plots/ under out_dir."""
    out_dir = Path(out_dir)
    plot_dir = out_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    rows = summarize(records, order)
    struct = structure_rows(records)
    plots: dict[str, list[str]] = {}
    for task in sorted({r.task for r in records}):
        a, s = plot_dir / f"anytime_{task}.png", plot_dir / f"schedule_{task}.png"
        plot_anytime(a, task, records, order)
        plot_schedules(s, task, records, order)
        plots[task] = [str(a.relative_to(out_dir)), str(s.relative_to(out_dir))]
    imp = plot_dir / "improvement.png"
    plot_improvement(imp, rows)
    plots[""] = [str(imp.relative_to(out_dir))]
    write_csv(out_dir / "leaderboard.csv", rows)
    write_csv(out_dir / "structure.csv", struct)
    (out_dir / "leaderboard.md").write_text(markdown(rows, struct, plots, header))
    return {"md": out_dir / "leaderboard.md", "csv": out_dir / "leaderboard.csv",
            "structure": out_dir / "structure.csv", "plots": plot_dir}


def main() -> None:
    p = argparse.ArgumentParser(description="Rebuild the leaderboard report from leaderboard.h5.")
    p.add_argument("out", nargs="?", default="results", help="folder holding leaderboard.h5")
    a = p.parse_args()
    path = Path(a.out) / COMBINED
    records = read_combined(path)
    with h5py.File(path, "r") as f:
        header = str(f.attrs.get("header", ""))
        order = json.loads(f.attrs.get("order", "[]"))
    paths = write_report(Path(a.out), records, header=header, order=order)
    print(f"report={paths['md']} runs={len(records)}")


if __name__ == "__main__":
    main()
