"""Paired comparisons of controllers, built from RunRecords: per task and across tasks.

A run is compared with its reference (grid search, the fixed default schedule, or the skills
agent: the tree search's ablation) on the same seed, so the same base, data order and test items.
Per task: the mean over seeds of the paired test-score difference, its 95% bootstrap CI over seeds
and test items (``stats.paired_difference`` on the stored per-item correctness), the t-interval
over seeds, a verdict that needs both to agree, both p-values Holm-adjusted across tasks (and the
exact sign-flip p over seeds beside them), and the probability of improvement. Where a
run lacks per-item correctness (logs from before it was stored) the pair falls back to a
bootstrap over seeds alone, and says so in ``ci_method``. Across tasks: the IQM over tasks x
seeds with a stratified bootstrap CI, of the test score and of the paired differences, and the
probability of improvement.

The base model is scored once per task (its greedy test score does not depend on the seed), so
its one run pairs with every seed.

The transfer column scores the chosen schedule retrained from the base on fresh seeds
(``extra["transfer"]``): per run, the mean over its replays, and per item the share of replays
that got the item right.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from benchmarks.leaderboard import stats
from benchmarks.leaderboard.runlog import BASE, RunRecord

# summary.json key -> reference
REFERENCES = {"pairs": "grid", "pairs_vs_fixed": "fixed", "pairs_vs_skills": "skills"}
LEVEL = 0.95
N_BOOT = 10_000
ITEMS, SEEDS = "seeds x items", "seeds"  # ci_method: what the bootstrap resampled

Sample = tuple[float, list[float] | None]  # a run's score and its item vector (None: missing)
Getter = Callable[[RunRecord], Sample]


# ---- one run ------------------------------------------------------------------------------------


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _consistent(items: Sequence[float], score: float) -> bool:
    # The item vector stands for the score only where its mean is the score (dev_metric
    # "mean_score" scores partial credit, which the 0/1 correctness does not hold).
    return bool(items) and abs(float(np.mean(items)) - score) <= 1e-9


def on_test(rec: RunRecord) -> Sample:
    """The run's test score and its per-item correctness (None where it was not stored)."""
    items = [float(c) for c in rec.test_correct]
    return rec.test_score, items if _consistent(items, rec.test_score) else None


def replays(rec: RunRecord) -> list[dict[str, Any]]:
    """The run's transfer replays with a finite test score (none in logs from before them)."""
    out = rec.extra.get("transfer") or []
    return [t for t in out if isinstance(t, dict) and _finite(t.get("test_score"))]


def on_transfer(rec: RunRecord) -> Sample:
    """Mean test score of the run's replays; per item, the share of replays right (or None)."""
    reps = replays(rec)
    if not reps:
        return math.nan, None
    score = float(np.mean([t["test_score"] for t in reps]))
    vectors = [[float(c) for c in t.get("test_correct") or []] for t in reps]
    if not all(_consistent(v, t["test_score"]) for v, t in zip(vectors, reps, strict=True)):
        return score, None
    if len({len(v) for v in vectors}) != 1:
        return score, None
    return score, np.mean(vectors, axis=0).tolist()


# ---- samples by seed ----------------------------------------------------------------------------


def seeds_of(records: Sequence[RunRecord]) -> list[int]:
    """The seeds the controllers ran (the base model's one run is not a seed)."""
    return sorted({r.seed for r in records if r.controller != BASE})


def samples(records: Sequence[RunRecord], task: str, controller: str,
            get: Getter = on_test) -> dict[int, Sample]:
    """seed -> sample of one (task, controller); runs without a finite score are left out."""
    runs = [r for r in records if r.task == task and r.controller == controller]
    if controller == BASE and len(runs) == 1:
        # Scored once and seed-independent: the one run pairs with every seed the task ran.
        one = get(runs[0])
        seeds = seeds_of([r for r in records if r.task == task]) or [runs[0].seed]
        return {s: one for s in seeds} if _finite(one[0]) else {}
    out = {r.seed: get(r) for r in runs}
    return {s: v for s, v in out.items() if _finite(v[0])}


# ---- one pair -----------------------------------------------------------------------------------


def _item_pairs(x: dict[int, Sample], ref: dict[int, Sample], seeds: list[int]
                ) -> tuple[dict[int, list[float]], dict[int, list[float]]] | None:
    """Both sides' item vectors on these seeds, or None unless all are there and equally long."""
    vectors = [x[s][1] for s in seeds] + [ref[s][1] for s in seeds]
    if any(v is None for v in vectors) or len({len(v) for v in vectors}) != 1:
        return None
    return {s: x[s][1] for s in seeds}, {s: ref[s][1] for s in seeds}


def pair(x: dict[int, Sample], ref: dict[int, Sample], n_boot: int = N_BOOT, seed: int = 0
         ) -> dict[str, Any]:
    """x minus ref on one task, paired by seed: summary.json's entry for one controller.

    mean_diff is the mean over the shared seeds of (x - ref); ci the 95% bootstrap CI over seeds
    and items (over seeds alone where items are missing: ci_method says which); t_ci the 95%
    t-interval over seeds; verdict "better" when both lie above 0, "worse" when both lie below,
    else "no difference"; poi the share of seeds on which x scores above ref (ties count 1/2);
    p_value the two-sided bootstrap p that the CI inverts and p_t the t-test's (both
    Holm-adjusted across tasks by compare: p_holm, p_t_holm, verdict_holm); p_sign_flip the exact
    sign-flip p over seeds, which needs no resampling assumption but cannot go below 2 / 2**n
    (0.0625 at 5 seeds, 0.002 at 10).
    """
    seeds = sorted(set(x) & set(ref))
    diffs = np.asarray([x[s][0] - ref[s][0] for s in seeds])
    out: dict[str, Any] = {
        "mean_diff": float(diffs.mean()) if seeds else math.nan, "ci": [math.nan, math.nan],
        "verdict": f"n/a ({len(seeds)} paired seed{'s' if len(seeds) != 1 else ''})",
        "n_seeds": len(seeds), "n_items": 0, "ci_method": "none",
        "poi": float(np.mean((diffs > 0) + 0.5 * (diffs == 0))) if seeds else math.nan,
        "p_value": math.nan, "p_holm": math.nan, "verdict_holm": "n/a",
        "p_sign_flip": math.nan, "t_ci": [math.nan, math.nan], "p_t": math.nan,
        "p_t_holm": math.nan}
    if len(seeds) < 2:
        return out  # one seed resamples to itself: no CI, no verdict
    items = _item_pairs(x, ref, seeds)
    method = ITEMS if items else SEEDS
    if items is None:
        items = {s: [x[s][0]] for s in seeds}, {s: [ref[s][0]] for s in seeds}
    d = stats.paired_difference(*items, level=LEVEL, n_boot=n_boot, seed=seed)
    out.update(mean_diff=d.mean_diff, ci=[d.ci_low, d.ci_high], verdict=d.verdict,
               n_items=d.n_items if method == ITEMS else 0, ci_method=method,
               p_value=d.p_boot, p_sign_flip=d.p_value, t_ci=[d.t_low, d.t_high], p_t=d.p_t)
    return out


def _holm_verdict(p: dict[str, Any]) -> str:
    """The verdict at 95% family-wise: both Holm-adjusted p-values (bootstrap, t) below 0.05."""
    if not (math.isfinite(p["p_holm"]) and math.isfinite(p["p_t_holm"])):
        return "n/a"
    if max(p["p_holm"], p["p_t_holm"]) >= 1 - LEVEL:
        return "no difference"
    return "better" if p["mean_diff"] > 0 else "worse"


def compare(records: Sequence[RunRecord], reference: str, order: Sequence[str],
            get: Getter = on_test, n_boot: int = N_BOOT) -> dict[str, dict[str, Any]]:
    """{task: {controller: pair}} against `reference`, p-values Holm-adjusted across tasks.

    The family of one controller is its tasks (``stats.holm`` of the bootstrap p-values, and of
    the t-test's): verdict_holm is the verdict at 95% family-wise, both adjusted p-values below
    0.05. Tasks without the reference give no entry; the reference's own entry has verdict
    "reference".
    """
    out: dict[str, dict[str, Any]] = {}
    for task in sorted({r.task for r in records}):
        ref = samples(records, task, reference, get)
        if not ref:
            continue
        out[task] = {}
        for c in [BASE, *order]:
            x = samples(records, task, c, get)
            if x:
                out[task][c] = pair(x, ref, n_boot)
                if c == reference:
                    out[task][c].update(verdict="reference", verdict_holm="reference")
    for c in [BASE, *order]:
        family = [out[t][c] for t in out if c in out[t] and math.isfinite(out[t][c]["p_value"])
                  and math.isfinite(out[t][c]["p_t"])]
        for key in ("p_value", "p_t"):
            adjusted = stats.holm([p[key] for p in family])
            for p, q in zip(family, adjusted, strict=True):
                p["p_holm" if key == "p_value" else "p_t_holm"] = q
        for p in family:
            if p["verdict_holm"] != "reference":
                p["verdict_holm"] = _holm_verdict(p)
    return out


# ---- across tasks -------------------------------------------------------------------------------


def matrices(records: Sequence[RunRecord], controller: str, reference: str,
             get: Getter = on_test) -> tuple[list[str], list[int], np.ndarray, np.ndarray]:
    """(tasks, seeds, x, ref): (n_seeds, n_tasks) scores on the tasks both ran and the seeds
    both ran on every one of them, rows paired by seed."""
    tasks, seeds = [], None
    by_task = {}
    for task in sorted({r.task for r in records}):
        x, ref = samples(records, task, controller, get), samples(records, task, reference, get)
        if x and ref:
            tasks.append(task)
            by_task[task] = (x, ref)
            both = set(x) & set(ref)
            seeds = both if seeds is None else seeds & both
    seeds = sorted(seeds or [])
    if not tasks or not seeds:
        return [], [], np.empty((0, 0)), np.empty((0, 0))
    x = np.array([[by_task[t][0][s][0] for t in tasks] for s in seeds])
    ref = np.array([[by_task[t][1][s][0] for t in tasks] for s in seeds])
    return tasks, seeds, x, ref


def _estimate(point: float, ci: tuple[float, float] | None) -> dict[str, Any]:
    return {"point": point, "ci": list(ci) if ci else [math.nan, math.nan]}


def _iqm(m: np.ndarray, n_boot: int) -> dict[str, Any]:
    if m.size == 0:
        return _estimate(math.nan, None)
    if m.shape[0] < 2:
        return _estimate(stats.iqm(m), None)
    e = stats.iqm_ci(m, LEVEL, n_boot)
    return _estimate(e.point, (e.low, e.high))


def _poi(x: np.ndarray, y: np.ndarray, n_boot: int) -> dict[str, Any]:
    if x.size == 0:
        return _estimate(math.nan, None)
    if x.shape[0] < 2:
        return _estimate(float(np.mean((x > y) + 0.5 * (x == y))), None)
    e = stats.probability_of_improvement(x, y, LEVEL, n_boot)
    return _estimate(e.point, (e.low, e.high))


def across_tasks(records: Sequence[RunRecord], order: Sequence[str], n_boot: int = N_BOOT
                 ) -> dict[str, dict[str, Any]]:
    """summary.json's "iqm": per controller, over tasks x seeds (stratified bootstrap CIs):
    the IQM of the test score, and against each reference the IQM of the paired difference and
    the probability of improvement."""
    out: dict[str, dict[str, Any]] = {}
    for c in [BASE, *order]:
        tasks, seeds, x, _ = matrices(records, c, c)
        if not tasks:
            continue
        entry: dict[str, Any] = {"tasks": tasks, "n_seeds": len(seeds), "test": _iqm(x, n_boot)}
        for ref in REFERENCES.values():
            _, ref_seeds, xs, rs = matrices(records, c, ref)
            entry[f"diff_vs_{ref}"] = _iqm(xs - rs, n_boot)
            entry[f"poi_vs_{ref}"] = _poi(xs, rs, n_boot)
            entry[f"n_seeds_vs_{ref}"] = len(ref_seeds)
        out[c] = entry
    return out


def transfer(records: Sequence[RunRecord], order: Sequence[str], n_boot: int = N_BOOT
             ) -> dict[str, dict[str, Any]]:
    """summary.json's "transfer": per task and controller, the replays' mean test score over
    seeds (95% bootstrap CI) and its pair against grid's replays."""
    vs = compare(records, REFERENCES["pairs"], order, on_transfer, n_boot)
    out: dict[str, dict[str, Any]] = {}
    for task in sorted({r.task for r in records}):
        for c in order:
            runs = [r for r in records if r.task == task and r.controller == c]
            scores = [on_transfer(r)[0] for r in runs]
            scores = [s for s in scores if math.isfinite(s)]
            if not scores:
                continue
            e = stats.bootstrap_ci(scores, LEVEL, n_boot)
            out.setdefault(task, {})[c] = {
                "mean": e.point, "ci": [e.low, e.high] if len(scores) > 1 else [math.nan] * 2,
                "n_seeds": len(scores), "replays": sum(len(replays(r)) for r in runs),
                "vs_grid": vs.get(task, {}).get(c)}
    return out
