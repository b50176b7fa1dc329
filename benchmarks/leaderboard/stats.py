"""Paired statistics for the leaderboard's standard preset: a controller against a reference.

Every run stores per-item test correctness, a 0/1 vector over the same test items for every
controller and seed. Seeds are paired (one seed gives every controller the same base, data order
and evaluation items), so a controller is compared with its reference (grid search, or the fixed
default schedule) seed by seed and item by item, never as two independent samples. A run's test
score is the mean of its item vector.

- ``bootstrap_ci``: the mean of one sample (a controller's test scores over seeds) and its CI
  (``scipy.stats.bootstrap``).
- ``paired_difference`` / ``compare_tasks``: the mean paired difference on a task, a bootstrap CI
  over seeds and items (our own: scipy has no hierarchical bootstrap), a t-interval over seeds
  (``scipy.stats.ttest_1samp``), a verdict that needs both to agree, and a sign-flip p-value over
  seeds (``scipy.stats.permutation_test``), Holm-adjusted across tasks (``statsmodels``'
  ``multipletests``).
- ``probability_of_improvement``: P(X > Y) over paired seeds, averaged over tasks.
- ``iqm`` / ``iqm_ci``: the interquartile mean across tasks x seeds, with a stratified bootstrap.
- ``performance_profile``: the share of runs scoring at least tau, with a stratified bootstrap band.

Every bootstrap takes a ``seed`` (default 0), so tables are stable from one build to the next.

The IQM and its CI follow rliable (Agarwal et al., 2021): ``iqm`` is ``metrics.aggregate_iqm``
(the 25% trimmed mean over all runs and tasks), and ``iqm_ci`` resamples runs within each task and
takes percentiles, as ``library.get_interval_estimates`` does by default. rliable is not imported:
its ``library`` needs arch < 8, which fails to import under the pandas 3 this project resolves.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
from numpy.typing import ArrayLike
from scipy.stats import bootstrap, permutation_test, trim_mean, ttest_1samp
from statsmodels.stats.multitest import multipletests

ItemScores = Mapping[int, Sequence[float]]  # seed -> that run's per-item test correctness (0/1)
EXACT_MAX_SEEDS = 12  # up to 2**12 = 4096 sign patterns are enumerated; beyond, they are sampled
_GATHER_LIMIT = 1 << 21  # values gathered per bootstrap chunk: bounds memory for long item vectors


class Estimate(NamedTuple):
    """A point estimate and its percentile bootstrap CI; unpacks like bootstrap_ci."""

    point: float
    low: float
    high: float


@dataclass(frozen=True)
class PairedDiff:
    """A controller minus its reference on one task, paired by seed and by test item."""

    mean_diff: float  # mean over seeds of (controller - reference) test score
    ci_low: float
    ci_high: float
    p_value: float  # two-sided paired sign-flip test over seeds (sign_flip_p_value)
    n_seeds: int
    n_items: int
    p_holm: float = math.nan  # p_value Holm-adjusted across the tasks compared (compare_tasks)
    # The two-sided p-value the bootstrap CI inverts: below 1 - level exactly when the CI
    # excludes 0 (up to ties at 0), so its Holm adjustment corrects the CI's verdict.
    p_boot: float = math.nan
    # The test over seeds: the t-interval of the per-seed differences and its two-sided p.
    t_low: float = math.nan
    t_high: float = math.nan
    p_t: float = math.nan

    @property
    def verdict(self) -> str:
        return verdict((self.ci_low, self.ci_high), (self.t_low, self.t_high))


# ---- input checks -------------------------------------------------------------------------------


def _check_bootstrap(level: float, n_boot: int) -> None:
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")


def _require_seeds(n_seeds: int, what: str) -> None:
    # One seed resamples to itself: a CI from it would claim a certainty the data can't give.
    if n_seeds < 2:
        raise ValueError(f"{what} needs at least 2 seeds, got {n_seeds}")


def _check_same_keys(x: Mapping, ref: Mapping, what: str) -> None:
    only_x, only_ref = sorted(set(x) - set(ref)), sorted(set(ref) - set(x))
    if only_x or only_ref:
        raise ValueError(f"{what} are not paired: only the controller has {only_x}, "
                         f"only the reference has {only_ref}")
    if not x:
        raise ValueError(f"no {what} to compare")


def _finite_array(values: ArrayLike, ndim: int, shape: str, noun: str, what: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != ndim or x.size == 0:
        raise ValueError(f"{what}: expected a non-empty {shape}, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{what}: the {noun} holds NaN or infinite values")
    return x


def _item_vector(values: Sequence[float], what: str) -> np.ndarray:
    return _finite_array(values, 1, "1-D item vector", "item vector", what)


def _score_matrix(values: ArrayLike, what: str) -> np.ndarray:
    return _finite_array(values, 2, "(n_seeds, n_tasks) matrix", "score matrix", what)


def paired_items(x: ItemScores, ref: ItemScores) -> tuple[list[int], np.ndarray, np.ndarray]:
    """(seeds, x, ref): both controllers' item vectors as (n_seeds, n_items), rows paired by seed.

    Raises ValueError when the seeds differ or any item vector differs in length from the rest.
    """
    _check_same_keys(x, ref, "seeds")
    seeds = sorted(x)
    rows = {name: [_item_vector(runs[s], f"{name} seed {s}") for s in seeds]
            for name, runs in (("controller", x), ("reference", ref))}
    n_items = rows["controller"][0].size
    for name, vectors in rows.items():
        for s, v in zip(seeds, vectors, strict=True):
            if v.size != n_items:
                raise ValueError(f"item vectors differ in length: {name} seed {s} has {v.size} "
                                 f"items, controller seed {seeds[0]} has {n_items}")
    return seeds, np.stack(rows["controller"]), np.stack(rows["reference"])


def paired_score_matrices(x_by_task: Mapping[str, ItemScores], ref_by_task: Mapping[str, ItemScores]
                          ) -> tuple[list[str], list[int], np.ndarray, np.ndarray]:
    """(tasks, seeds, x, ref): test scores as (n_seeds, n_tasks) matrices, rows paired by seed.

    The shape rliable's metrics take; every task must hold the same seeds.
    """
    tasks = _paired_tasks(x_by_task, ref_by_task)
    seeds: list[int] | None = None
    x_cols, ref_cols = [], []
    for task in tasks:
        try:
            task_seeds, xs, rs = paired_items(x_by_task[task], ref_by_task[task])
        except ValueError as e:
            raise ValueError(f"task {task!r}: {e}") from e
        if seeds is not None and task_seeds != seeds:
            raise ValueError(f"task {task!r} has seeds {task_seeds}, task {tasks[0]!r} has {seeds}")
        seeds = task_seeds
        x_cols.append(xs.mean(axis=1))
        ref_cols.append(rs.mean(axis=1))
    assert seeds is not None  # _paired_tasks refuses an empty family
    return tasks, seeds, np.stack(x_cols, axis=1), np.stack(ref_cols, axis=1)


def _paired_tasks(x_by_task: Mapping[str, ItemScores], ref_by_task: Mapping[str, ItemScores]
                  ) -> list[str]:
    _check_same_keys(x_by_task, ref_by_task, "tasks")
    return list(x_by_task)


# ---- bootstraps ---------------------------------------------------------------------------------


def _percentiles(boot: np.ndarray, level: float) -> tuple[float, float]:
    lo, hi = np.quantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(lo), float(hi)


def _seed_item_means(d: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """n_boot bootstrap means of d (n_seeds, n_items): seeds with replacement, then items within
    each drawn seed with replacement."""
    n_seeds, n_items = d.shape
    chunk = max(1, _GATHER_LIMIT // (n_seeds * n_items))
    out = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        b = min(chunk, n_boot - start)
        rows = rng.integers(0, n_seeds, size=(b, n_seeds, 1))
        cols = rng.integers(0, n_items, size=(b, n_seeds, n_items))
        # Every drawn seed holds n_items draws, so the flat mean is the mean of per-seed means.
        out[start:start + b] = d[rows, cols].mean(axis=(1, 2))
    return out


def _stratified_resamples(scores: np.ndarray, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """(n_boot, n_seeds, n_tasks): seeds drawn with replacement within each task independently.

    Tasks are fixed strata and only runs are random, as in rliable's StratifiedBootstrap.
    """
    n_seeds, n_tasks = scores.shape
    rows = rng.integers(0, n_seeds, size=(n_boot, n_seeds, n_tasks))
    return scores[rows, np.arange(n_tasks)]


def bootstrap_ci(values: Sequence[float], level: float = 0.95, n_boot: int = 10_000,
                 seed: int = 0) -> Estimate:
    """(mean, low, high): percentile bootstrap CI of the mean of one sample (e.g. over seeds),
    ``scipy.stats.bootstrap``.

    Empty input gives NaNs, one value (or all equal) a zero-width CI: the tables show what there
    is (scipy refuses a sample without spread).
    """
    _check_bootstrap(level, n_boot)
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return Estimate(math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if np.all(x == x[0]):
        return Estimate(mean, mean, mean)
    ci = bootstrap((x,), np.mean, n_resamples=n_boot, confidence_level=level,
                   method="percentile", rng=np.random.default_rng(seed)).confidence_interval
    return Estimate(mean, float(ci.low), float(ci.high))


# ---- paired differences -------------------------------------------------------------------------


def verdict(ci: tuple[float, float], t_ci: tuple[float, float]) -> str:
    """The verdict on a difference from two intervals that must agree: the seeds x items
    bootstrap CI and the t-interval over seeds. "better" when both lie above 0, "worse" when both
    lie below, else "no difference"."""
    if ci[0] > 0 and t_ci[0] > 0:
        return "better"
    if ci[1] < 0 and t_ci[1] < 0:
        return "worse"
    return "no difference"


def t_interval(diffs: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(low, high, p): the t-interval of the mean of per-seed differences at ``level`` and the
    two-sided one-sample t-test's p of "the mean is 0" (``scipy.stats.ttest_1samp``).

    Differences without spread (every seed the same, up to rounding) give the point itself as the
    interval, and p 0 unless that point is 0 (scipy gives NaN or noise there).
    """
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 1 or d.size < 2 or not np.all(np.isfinite(d)):
        raise ValueError(f"a t-interval needs a finite 1-D vector of at least 2 per-seed "
                         f"differences, got {d!r}")
    if np.allclose(d, d[0], rtol=0.0, atol=1e-12):   # scipy loses all precision here
        point = float(d.mean())
        return point, point, 1.0 if abs(point) <= 1e-12 else 0.0
    result = ttest_1samp(d, 0.0)
    ci = result.confidence_interval(level)
    return float(ci.low), float(ci.high), float(result.pvalue)


def sign_flip_p_value(diffs: Sequence[float], n_perm: int = 10_000, seed: int = 0) -> float:
    """Two-sided paired sign-flip (permutation) test of mean(diffs) == 0; diffs one per seed.

    With no difference the two controllers are exchangeable within a seed, so each per-seed
    difference is as likely to have either sign: ``scipy.stats.permutation_test`` of one sample
    flips signs. Exact (all 2**n sign patterns, the observed one included) for n <=
    EXACT_MAX_SEEDS, or wherever n_perm >= 2**n; beyond, n_perm random patterns, with scipy's
    (1 + hits) / (1 + n_perm) so a sampled p is never 0. The smallest exact p is 2 / 2**n: 0.0625
    at 5 seeds.
    """
    d = np.asarray(diffs, dtype=np.float64)
    if d.ndim != 1 or d.size == 0 or not np.all(np.isfinite(d)):
        raise ValueError(f"diffs must be a non-empty 1-D finite vector, got {d!r}")
    n_resamples = math.inf if d.size <= EXACT_MAX_SEEDS else n_perm
    result = permutation_test((d,), np.mean, permutation_type="samples", vectorized=True,
                              n_resamples=n_resamples, alternative="two-sided",
                              rng=np.random.default_rng(seed))
    return float(result.pvalue)


def bootstrap_p_value(boot: ArrayLike) -> float:
    """Two-sided p-value of "the difference is 0" from bootstrap draws of it.

    Twice the smaller share of draws on either side of 0 (draws at 0 count on both), each share
    as (1 + hits) / (1 + draws) so it is never 0; capped at 1. Inverts the percentile CI.
    """
    b = np.asarray(boot, dtype=np.float64)
    if b.ndim != 1 or b.size == 0:
        raise ValueError(f"expected a non-empty 1-D vector of bootstrap draws, got shape {b.shape}")
    below, above = (1 + np.sum(b <= 0)) / (1 + b.size), (1 + np.sum(b >= 0)) / (1 + b.size)
    return float(min(1.0, 2 * min(below, above)))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values, in the input order (family-wise error control):
    ``statsmodels``' ``multipletests(method="holm")``.

    The k-th smallest of m p-values is scaled by (m - k + 1), capped at 1, then made
    non-decreasing in that order so a smaller raw p never gets a larger adjusted one.
    """
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1 or not np.all((p >= 0) & (p <= 1)):
        raise ValueError(f"p-values must be a 1-D vector of numbers in [0, 1], got {p!r}")
    if p.size == 0:
        return []
    return multipletests(p, method="holm")[1].tolist()


def paired_difference(x: ItemScores, ref: ItemScores, level: float = 0.95, n_boot: int = 10_000,
                      seed: int = 0) -> PairedDiff:
    """Controller x minus reference ref on one task, paired by seed, with a bootstrap CI and a
    t-interval over seeds, whose verdict needs both to agree.

    The CI resamples seeds with replacement and, within each drawn seed, test items with
    replacement; the same items are drawn for both controllers (the per-item difference is what is
    resampled), so the pairing holds at both levels. The t-interval (``t_interval``) is over the
    per-seed differences alone: it asks whether the seeds agree, where the bootstrap's items can
    make a few seeds look certain. The p-value is sign_flip_p_value over seeds.
    """
    _check_bootstrap(level, n_boot)
    seeds, xs, rs = paired_items(x, ref)
    _require_seeds(len(seeds), "a paired-difference CI")
    d = xs - rs
    per_seed = d.mean(axis=1)
    boot = _seed_item_means(d, n_boot, np.random.default_rng(seed))
    low, high = _percentiles(boot, level)
    t_low, t_high, p_t = t_interval(per_seed, level)
    return PairedDiff(mean_diff=float(per_seed.mean()), ci_low=low, ci_high=high,
                      p_value=sign_flip_p_value(per_seed, seed=seed), n_seeds=len(seeds),
                      n_items=d.shape[1], p_boot=bootstrap_p_value(boot), t_low=t_low,
                      t_high=t_high, p_t=p_t)


def compare_tasks(x_by_task: Mapping[str, ItemScores], ref_by_task: Mapping[str, ItemScores],
                  level: float = 0.95, n_boot: int = 10_000, seed: int = 0
                  ) -> dict[str, PairedDiff]:
    """paired_difference on every task, with p_holm: the p-values Holm-adjusted across the tasks.

    The family is this one controller-vs-reference pair over all its tasks.
    """
    diffs: dict[str, PairedDiff] = {}
    for task in _paired_tasks(x_by_task, ref_by_task):
        try:
            diffs[task] = paired_difference(x_by_task[task], ref_by_task[task], level, n_boot, seed)
        except ValueError as e:
            raise ValueError(f"task {task!r}: {e}") from e
    adjusted = holm([d.p_value for d in diffs.values()])
    return {t: replace(d, p_holm=p) for (t, d), p in zip(diffs.items(), adjusted, strict=True)}


# ---- aggregates across tasks --------------------------------------------------------------------


def probability_of_improvement(x: ArrayLike, y: ArrayLike, level: float = 0.95,
                               n_boot: int = 10_000, seed: int = 0) -> Estimate:
    """P(X > Y): per task the share of seeds on which X scores above Y (a tie counts 1/2),
    averaged over tasks; x and y are (n_seeds, n_tasks) test scores, row s of both from seed s.

    rliable's probability_of_improvement compares every run of X with every run of Y (the
    Mann-Whitney statistic); with paired seeds only same-seed pairs are compared. The CI resamples
    seeds within each task, the same rows for x and y, so pairs stay pairs.
    """
    _check_bootstrap(level, n_boot)
    xs, ys = _score_matrix(x, "x"), _score_matrix(y, "y")
    if xs.shape != ys.shape:
        raise ValueError(f"score matrices differ in shape: x {xs.shape}, y {ys.shape}")
    _require_seeds(xs.shape[0], "a probability-of-improvement CI")
    wins = (xs > ys) + 0.5 * (xs == ys)
    # Every task holds the same number of seeds, so the flat mean is the mean of per-task shares.
    boot = _stratified_resamples(wins, n_boot, np.random.default_rng(seed)).mean(axis=(1, 2))
    return Estimate(float(wins.mean()), *_percentiles(boot, level))


def iqm(scores: ArrayLike) -> float:
    """Interquartile mean of all scores (the 25% trimmed mean), rliable's aggregate_iqm."""
    return float(trim_mean(_score_matrix(scores, "scores"), proportiontocut=0.25, axis=None))


def iqm_ci(scores: ArrayLike, level: float = 0.95, n_boot: int = 10_000, seed: int = 0) -> Estimate:
    """IQM of (n_seeds, n_tasks) scores with a stratified percentile bootstrap CI over seeds."""
    _check_bootstrap(level, n_boot)
    s = _score_matrix(scores, "scores")
    _require_seeds(s.shape[0], "an IQM CI")
    boot = _stratified_resamples(s, n_boot, np.random.default_rng(seed)).reshape(n_boot, -1)
    return Estimate(iqm(s), *_percentiles(trim_mean(boot, proportiontocut=0.25, axis=1), level))


def performance_profile(scores: ArrayLike, taus: ArrayLike, level: float = 0.95,
                        n_boot: int = 10_000, seed: int = 0
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(profile, low, high): for each tau the share of runs (seeds x tasks) scoring >= tau.

    rliable's run-score performance profile (``create_performance_profile``), its band from the
    same stratified bootstrap over seeds as iqm_ci (``plot_utils.plot_performance_profiles``).
    """
    _check_bootstrap(level, n_boot)
    s = _score_matrix(scores, "scores")
    _require_seeds(s.shape[0], "a performance-profile band")
    t = np.asarray(taus, dtype=np.float64)
    if t.ndim != 1 or t.size == 0:
        raise ValueError(f"taus must be a non-empty 1-D vector, got shape {t.shape}")
    point = (s.reshape(-1, 1) >= t).mean(axis=0)
    boot = _stratified_resamples(s, n_boot, np.random.default_rng(seed)).reshape(n_boot, -1)
    # Sorted runs: the share >= tau is one searchsorted per tau, not a (boot, runs, taus) cube.
    runs = boot.shape[1]
    shares = 1.0 - np.stack([np.searchsorted(b, t, side="left") for b in np.sort(boot, axis=1)]
                            ) / runs
    lows, highs = np.quantile(shares, [(1 - level) / 2, 1 - (1 - level) / 2], axis=0)
    return point, lows, highs
