"""The leaderboard's figures; every estimate is drawn with its 95% CI over seeds.

- ``anytime_<task>.png``: the dev score of the state the selection rule chose vs stages spent
  (mean over seeds, bootstrap band).
- ``schedule_<task>.png``: the chosen schedules' values per stage (mean over the seeds whose
  schedule reaches the stage, bootstrap error bars; geometric for the learning rate).
- ``differences.png``: paired test-score differences against grid, fixed and skills, per task.
- ``iqm.png``: across tasks x seeds, the IQM of the test score and of the difference against grid,
  and the probability of improving on grid (stratified bootstrap CIs).
- ``profile.png``: performance profile, the share of (task, seed) runs whose normalized score is
  at least tau (PROFILE_NORMALIZATION), with stratified bootstrap bands.
- ``structure.png``: the structure statistic of each schedule group against the 95% intervals of
  its two nulls (random schedules; the schedule's own stages shuffled).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from benchmarks.leaderboard import pairs, stats  # noqa: E402
from benchmarks.leaderboard.runlog import BASE, RunRecord  # noqa: E402
from benchmarks.leaderboard.structure import CAPACITY, REGULARIZATION, STATISTICS  # noqa: E402

PROFILE_NORMALIZATION = (
    "per task, (test - base) / (best - base): 0 is the base model's test score, 1 the best test "
    "score any run reached on the task (where no run beat the base model, test - base); tasks "
    "differ in how much training can gain, and this puts every task's gain on one scale")
DPI = 110


def _order(records: Sequence[RunRecord], order: Sequence[str] | None) -> list[str]:
    """Controllers in the given order, then any others alphabetically; never the base."""
    present = {r.controller for r in records} - {BASE}
    first = [c for c in (order or []) if c in present]
    return first + sorted(present - set(first))


def _save(fig: plt.Figure, path: Path) -> None:
    fig.savefig(path, dpi=DPI)
    plt.close(fig)


def _yerr(point: float, ci: Sequence[float]) -> list[list[float]]:
    """Error-bar lengths below and above; 0 where the CI is not known (one seed)."""
    lo, hi = ci
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [[0.0], [0.0]]
    return [[max(point - lo, 0.0)], [max(hi - point, 0.0)]]


def _bands(m: np.ndarray, n_boot: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and bootstrap CI over rows (seeds), column by column; NaNs are left out."""
    est = [stats.bootstrap_ci(col[np.isfinite(col)], n_boot=n_boot) for col in m.T]
    return tuple(np.array([e[i] for e in est]) for i in range(3))  # type: ignore[return-value]


# ---- per task -----------------------------------------------------------------------------------


def _anytime_matrix(runs: Sequence[RunRecord], horizon: int) -> np.ndarray:
    """The chosen state's dev score after k = 0..horizon stages for each run (its last point at
    or before k), carried forward past its last stage."""
    out = np.full((len(runs), horizon + 1), np.nan)
    for i, r in enumerate(runs):
        curve = sorted(r.anytime) or [(0, r.base_dev_score)]
        for k in range(horizon + 1):
            seen = [b for s, b in curve if s <= k]
            out[i, k] = seen[-1] if seen else r.base_dev_score
    return out


def plot_anytime(path: Path, task: str, records: Sequence[RunRecord],
                 order: Sequence[str] | None = None, n_boot: int = pairs.N_BOOT) -> None:
    """The chosen state's dev score vs stages spent, one line per controller (mean, 95% CI band
    over seeds)."""
    runs = [r for r in records if r.task == task and r.controller != BASE]
    horizon = max([max(r.budget, r.stages_spent) for r in runs] + [1])
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    x = np.arange(horizon + 1)
    for c in _order(runs, order):
        mean, lo, hi = _bands(_anytime_matrix([r for r in runs if r.controller == c], horizon),
                              n_boot)
        (line,) = ax.plot(x, mean, marker="o", ms=2, label=c)
        ax.fill_between(x, lo, hi, alpha=0.15, color=line.get_color())
    base = [r.base_dev_score for r in records if r.task == task and math.isfinite(r.base_dev_score)]
    if base:
        ax.axhline(float(np.mean(base)), color="gray", ls="--", lw=1, label="base")
    ax.set(xlabel="stages spent", ylabel="dev score of the chosen state",
           title=f"{task}: anytime performance (mean, 95% CI over seeds)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save(fig, path)


def plot_schedules(path: Path, task: str, records: Sequence[RunRecord],
                   order: Sequence[str] | None = None, n_boot: int = pairs.N_BOOT) -> None:
    """Each controller's chosen value per stage: mean over the seeds whose schedule reaches the
    stage, 95% CI error bars (the learning rate on a log scale, averaged in log10)."""
    mine = [r for r in records if r.task == task and r.controller != BASE]
    ctrls = _order(mine, order)
    names = [n for n in (*CAPACITY, *REGULARIZATION)
             if any(hp.get(n) is not None for r in mine for hp in r.schedule)] or [""]
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 2.8 * rows), squeeze=False)
    longest = max([len(r.schedule) for r in mine] + [1])
    for ax, name in zip(axes.flat, names, strict=False):
        log = name == "learning_rate"
        for i, c in enumerate(ctrls):
            m = np.full((0, longest), np.nan)
            for r in (r for r in mine if r.controller == c):
                v = [hp.get(name) for hp in r.schedule]
                row = [float(x) if isinstance(x, (int, float)) else np.nan for x in v]
                m = np.vstack([m, row + [np.nan] * (longest - len(row))])
            if not np.isfinite(m).any():
                continue
            mean, lo, hi = _bands(np.log10(m) if log else m, n_boot)
            if log:
                mean, lo, hi = 10**mean, 10**lo, 10**hi
            # A small horizontal offset per controller keeps identical schedules visible.
            x = np.arange(1, longest + 1) + 0.06 * (i - (len(ctrls) - 1) / 2)
            ax.errorbar(x, mean, yerr=[np.nan_to_num(mean - lo), np.nan_to_num(hi - mean)],
                        marker="o", ms=3, lw=1, capsize=2, label=c)
        if log:
            ax.set_yscale("log")
        kind = "capacity" if name in CAPACITY else "regularization"
        ax.set(title=f"{name} ({kind})" if name else "no schedules", xlabel="stage")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(6, len(labels)), fontsize=7)
    fig.suptitle(f"{task}: chosen schedules (mean over seeds reaching each stage, 95% CI)")
    fig.tight_layout(rect=(0, 0.07, 1, 0.95))
    _save(fig, path)


# ---- across tasks -------------------------------------------------------------------------------


def plot_differences(path: Path, summary: dict[str, Any], order: Sequence[str]) -> None:
    """Paired test-score difference against each reference (grid, fixed, skills) per task, 95%
    CI bars."""
    fig, axes = plt.subplots(1, len(pairs.REFERENCES), figsize=(5.5 * len(pairs.REFERENCES), 3.8))
    # One colour per controller in every panel (a panel leaves its reference out).
    color = {c: f"C{i % 10}" for i, c in enumerate([BASE, *order])}
    for ax, (key, ref) in zip(axes, pairs.REFERENCES.items(), strict=True):
        by_task = summary.get(key, {})
        tasks = sorted(by_task)
        ctrls = [c for c in [BASE, *order] if c != ref and any(c in by_task[t] for t in tasks)]
        width = 0.8 / max(len(ctrls), 1)
        for j, c in enumerate(ctrls):
            for i, t in enumerate(tasks):
                p = by_task[t].get(c)
                if p is None or not math.isfinite(p["mean_diff"]):
                    continue
                ax.errorbar(i + (j - (len(ctrls) - 1) / 2) * width, p["mean_diff"],
                            yerr=_yerr(p["mean_diff"], p["ci"]), fmt="o", ms=3, capsize=2,
                            color=color[c], label=c if i == 0 else None)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xticks(np.arange(len(tasks)), tasks)
        ax.set(ylabel=f"test score - {ref} (paired)", title=f"Against {ref} (mean, 95% CI)")
    legend = {label: h for ax in axes for h, label in zip(*ax.get_legend_handles_labels(),
                                                          strict=True)}
    fig.legend(legend.values(), legend.keys(), loc="lower center",
               ncol=min(10, max(len(legend), 1)), fontsize=7)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    _save(fig, path)


def plot_iqm(path: Path, iqm: dict[str, dict[str, Any]], order: Sequence[str]) -> None:
    """Across tasks x seeds: IQM test score, IQM difference against grid, P(better than grid)."""
    ctrls = [c for c in [BASE, *order] if c in iqm]
    panels = (("test", "IQM test score"), ("diff_vs_grid", "IQM of test - grid"),
              ("poi_vs_grid", "P(test > grid)"))
    fig, axes = plt.subplots(1, 3, figsize=(12, 0.9 + 0.35 * max(len(ctrls), 1)), sharey=True)
    y = np.arange(len(ctrls))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for i, c in enumerate(ctrls):
            e = iqm[c][key]
            if math.isfinite(e["point"]):
                err = _yerr(e["point"], e["ci"])
                ax.errorbar(e["point"], i, xerr=err, fmt="o", ms=4, capsize=3, color=f"C{i % 10}")
        if key != "test":
            ax.axvline(0.5 if key.startswith("poi") else 0.0, color="gray", ls="--", lw=0.8)
        ax.set(title=f"{title} (95% CI)")
    axes[0].set_yticks(y, ctrls)
    axes[0].invert_yaxis()
    fig.tight_layout()
    _save(fig, path)


def normalizer(records: Sequence[RunRecord]) -> pairs.Getter:
    """rec -> its normalized test score (PROFILE_NORMALIZATION), as a pairs sample."""
    base, best = {}, {}
    for task in {r.task for r in records}:
        mine = [r for r in records if r.task == task]
        b = [r.test_score for r in mine if r.controller == BASE]
        base[task] = float(np.mean(b)) if b else 0.0
        best[task] = max(r.test_score for r in mine)

    def get(rec: RunRecord) -> pairs.Sample:
        gain = best[rec.task] - base[rec.task]
        return (rec.test_score - base[rec.task]) / (gain if gain > 0 else 1.0), None

    return get


def plot_profile(path: Path, records: Sequence[RunRecord], order: Sequence[str] | None = None,
                 n_boot: int = pairs.N_BOOT) -> None:
    """Share of (task, seed) runs with normalized score >= tau, per controller, 95% bands."""
    get = normalizer(records)
    ctrls = [BASE, *_order(records, order)]
    mats = {c: pairs.matrices(records, c, c, get)[2] for c in ctrls}
    mats = {c: m for c, m in mats.items() if m.size}
    low = min([float(m.min()) for m in mats.values()] + [0.0])
    taus = np.linspace(low, 1.0, 101)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for c, m in mats.items():
        if m.shape[0] >= 2:
            point, lo, hi = stats.performance_profile(m, taus, n_boot=n_boot)
        else:  # one seed: no band to draw
            point = lo = hi = (m.reshape(-1, 1) >= taus).mean(axis=0)
        (line,) = ax.plot(taus, point, lw=1.3, label=c, ls="--" if c == BASE else "-")
        ax.fill_between(taus, lo, hi, alpha=0.12, color=line.get_color())
    ax.set(xlabel="normalized test score tau (0 = base model, 1 = best run on the task)",
           ylabel="fraction of runs with score >= tau", ylim=(0, 1.02),
           title="Performance profile over tasks x seeds (95% bands)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save(fig, path)


def plot_structure(path: Path, structure: dict[str, Any]) -> None:
    """Each group's structure statistic (dot) against the 95% intervals of its nulls (bars)."""
    groups = {g: e for g, e in structure.get("groups", {}).items() if e["schedules"]}
    fig, axes = plt.subplots(1, len(STATISTICS), figsize=(10, 3.6))
    for ax, stat in zip(axes, STATISTICS, strict=True):
        cells = [(f"{g}\n{kind}", entry[kind][stat]) for g, entry in groups.items()
                 for kind in structure["classes"]]
        for x, (_, s) in enumerate(cells):
            for dx, n, label, color in ((-0.12, "", "random 95%", "gray"),
                                        (0.12, "shuffled_", "shuffled 95%", "C0")):
                if math.isfinite(s[f"{n}null_mean"]):
                    ax.errorbar(x + dx, s[f"{n}null_mean"],
                                yerr=_yerr(s[f"{n}null_mean"], s[f"{n}null_ci"]), fmt="_",
                                color=color, capsize=5, label=label)
            if math.isfinite(s["value"]):
                ax.plot(x, s["value"], "o", color="C3", label="observed")
        ax.set_xticks(range(len(cells)), [label for label, _ in cells], fontsize=7)
        ax.set(title=stat.replace("_", " "))
        handles, labels = ax.get_legend_handles_labels()
        keep = dict(zip(labels, handles, strict=True))  # one legend entry per kind
        if keep:
            ax.legend(keep.values(), keep.keys(), fontsize=7)
    fig.suptitle(f"Schedule structure vs its nulls (schedules >= {structure.get('min_stages')} "
                 "stages)")
    fig.tight_layout()
    _save(fig, path)
