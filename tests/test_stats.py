"""The standard preset's paired statistics: differences, verdicts, sign-flip p, Holm, PoI, IQM."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
from scipy.stats import trim_mean

from benchmarks.leaderboard import stats


def bernoulli_runs(p: float, n_seeds: int = 5, n_items: int = 200, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {s: (rng.random(n_items) < p).astype(float).tolist() for s in range(n_seeds)}


# ---- paired differences -------------------------------------------------------------------------


def test_better_on_every_item_of_every_seed_is_better():
    x = {s: [1.0] * 50 for s in range(5)}
    ref = {s: [0.0] * 50 for s in range(5)}
    d = stats.paired_difference(x, ref)
    assert (d.mean_diff, d.ci_low, d.ci_high) == (1.0, 1.0, 1.0)
    assert d.verdict == "better" and (d.n_seeds, d.n_items) == (5, 50)
    assert d.p_value == pytest.approx(2 / 2**5)  # the smallest exact p at 5 seeds


def test_clearly_better_with_noise_is_better_and_the_swap_is_worse():
    x, ref = bernoulli_runs(0.7, seed=1), bernoulli_runs(0.3, seed=2)
    d = stats.paired_difference(x, ref, n_boot=2000)
    assert 0 < d.ci_low < d.mean_diff < d.ci_high and d.verdict == "better"
    assert d.mean_diff == pytest.approx(0.4, abs=0.05)
    assert stats.paired_difference(ref, x, n_boot=2000).verdict == "worse"


def test_identical_controllers_have_no_difference():
    # Noisy item vectors, identical in both: the same items are drawn for both controllers, so
    # every resampled difference is exactly 0. Independent draws would give a wide CI instead.
    x = bernoulli_runs(0.5)
    d = stats.paired_difference(x, {s: list(v) for s, v in x.items()})
    assert (d.mean_diff, d.ci_low, d.ci_high) == (0.0, 0.0, 0.0)
    assert d.verdict == "no difference" and d.p_value == 1.0


def test_swapped_pair_negates_the_difference():
    x, ref = bernoulli_runs(0.55, seed=3), bernoulli_runs(0.45, seed=4)
    d, back = stats.paired_difference(x, ref), stats.paired_difference(ref, x)
    assert back.mean_diff == -d.mean_diff
    assert (back.ci_low, back.ci_high) == pytest.approx((-d.ci_high, -d.ci_low))
    assert back.p_value == d.p_value


def test_item_resampling_widens_the_ci_when_seeds_agree():
    # Both seeds differ by exactly 0.5, so a bootstrap over seeds alone would give (0.5, 0.5);
    # resampling 100 items within each seed adds about +-1.96 * sqrt(0.25 / 200) = +-0.069.
    x = {0: [1.0, 0.0] * 50, 1: [0.0, 1.0] * 50}
    ref = {0: [0.0] * 100, 1: [0.0] * 100}
    d = stats.paired_difference(x, ref)
    assert d.mean_diff == 0.5 and d.verdict == "better"
    assert d.ci_low < 0.5 < d.ci_high
    assert 0.1 < d.ci_high - d.ci_low < 0.18


def test_verdict_thresholds_need_both_intervals_on_one_side():
    assert stats.verdict((0.01, 0.2), (0.02, 0.3)) == "better"
    assert stats.verdict((-0.2, -0.01), (-0.3, -0.001)) == "worse"
    assert stats.verdict((-0.1, 0.1), (-0.1, 0.1)) == stats.verdict((0.0, 0.3), (0.1, 0.2)) \
        == "no difference"
    # One interval alone is not enough, either way round.
    assert stats.verdict((0.01, 0.2), (-0.01, 0.3)) == "no difference"
    assert stats.verdict((-0.01, 0.2), (0.01, 0.3)) == "no difference"
    assert stats.verdict((-0.2, -0.01), (-0.3, 0.01)) == "no difference"


def test_a_bootstrap_ci_the_seeds_do_not_back_is_no_difference():
    # Five seeds of 200 items; per-seed differences +0.06, +0.08, -0.01, +0.07, 0.00. The
    # seeds x items bootstrap excludes 0 (the items make each seed look certain), but the seeds
    # disagree: the t-interval over them includes 0, so the verdict is no difference.
    diffs = [0.06, 0.08, -0.01, 0.07, 0.0]
    x = {s: [1.0] * round(max(d, 0) * 200) + [0.0] * (200 - round(max(d, 0) * 200))
         for s, d in enumerate(diffs)}
    ref = {s: ([1.0] * 2 + [0.0] * 198) if d < 0 else [0.0] * 200 for s, d in enumerate(diffs)}
    d = stats.paired_difference(x, ref, n_boot=4000)
    assert d.mean_diff == pytest.approx(0.04)
    assert d.ci_low > 0 and d.t_low < 0 < d.t_high
    assert d.p_boot < 0.05 < d.p_t and d.verdict == "no difference"


def test_t_interval_is_the_one_sample_t_interval_of_the_seed_differences():
    d = [0.1, 0.2, 0.3, 0.05]
    low, high, p = stats.t_interval(d)
    m, se = np.mean(d), np.std(d, ddof=1) / np.sqrt(len(d))
    half = scipy.stats.t.ppf(0.975, len(d) - 1) * se
    assert (low, high) == pytest.approx((m - half, m + half))
    assert p == pytest.approx(2 * scipy.stats.t.sf(m / se, len(d) - 1))
    assert stats.t_interval([0.5, 0.5]) == (0.5, 0.5, 0.0)    # seeds agree exactly
    assert stats.t_interval([0.0, 0.0, 0.0]) == (0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="at least 2 per-seed differences"):
        stats.t_interval([0.1])


def test_bootstraps_are_deterministic_under_a_seed():
    x, ref = bernoulli_runs(0.55, seed=5), bernoulli_runs(0.5, seed=6)
    assert stats.paired_difference(x, ref, seed=7) == stats.paired_difference(x, ref, seed=7)
    assert stats.paired_difference(x, ref, seed=7) != stats.paired_difference(x, ref, seed=8)
    m = np.random.default_rng(0).random((5, 3))
    assert stats.iqm_ci(m, seed=1) == stats.iqm_ci(m, seed=1) != stats.iqm_ci(m, seed=2)
    y = np.random.default_rng(1).random((5, 3))
    assert (stats.probability_of_improvement(m, y, seed=1)
            == stats.probability_of_improvement(m, y, seed=1))


# ---- sign-flip test and Holm --------------------------------------------------------------------


def test_sign_flip_p_value_exact():
    # d = (3, 1, -1): |sum| = 3 observed; of the 8 sign patterns, +-5, +-3, +-3 reach it.
    assert stats.sign_flip_p_value([3.0, 1.0, -1.0]) == pytest.approx(6 / 8)
    assert stats.sign_flip_p_value([1.0] * 6) == pytest.approx(2 / 64)
    assert stats.sign_flip_p_value([0.1, -0.1]) == 1.0
    assert stats.sign_flip_p_value([0.0, 0.0, 0.0]) == 1.0


def test_sign_flip_p_value_sampled_beyond_twelve_seeds():
    p = stats.sign_flip_p_value([0.1] * 13, seed=3)  # exact p would be 2 / 8192
    assert 0 < p < 0.002 and p == stats.sign_flip_p_value([0.1] * 13, seed=3)
    assert stats.sign_flip_p_value([0.1, -0.1] * 8) > 0.9


def test_holm_known_values():
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert stats.holm([0.01, 0.02, 0.03]) == pytest.approx([0.03, 0.04, 0.04])
    assert stats.holm([0.5, 0.6]) == [1.0, 1.0]
    assert stats.holm([0.2]) == [0.2] and stats.holm([]) == []


def test_compare_tasks_holm_adjusts_across_tasks():
    ones, zeros = {s: [1.0] * 10 for s in range(6)}, {s: [0.0] * 10 for s in range(6)}
    x = {"a": ones, "b": ones, "c": bernoulli_runs(0.5, n_seeds=6)}
    ref = {"a": zeros, "b": ones, "c": bernoulli_runs(0.5, n_seeds=6, seed=9)}
    out = stats.compare_tasks(x, ref, n_boot=1000)
    assert list(out) == ["a", "b", "c"]
    assert [d.p_holm for d in out.values()] == stats.holm([d.p_value for d in out.values()])
    assert out["a"].p_value == pytest.approx(2 / 64)
    assert out["a"].p_holm == pytest.approx(3 * 2 / 64)
    assert out["a"].verdict == "better" and out["b"].verdict == "no difference"


# ---- probability of improvement and IQM ---------------------------------------------------------


def test_probability_of_improvement_is_paired_by_seed():
    # Paired, X beats Y on every seed; unpaired (rliable's Mann-Whitney form) it would be 10/16.
    x = np.array([[1.0], [2.0], [3.0], [4.0]])
    est = stats.probability_of_improvement(x, x - 0.5)
    assert tuple(est) == (1.0, 1.0, 1.0)
    assert tuple(stats.probability_of_improvement(x - 0.5, x)) == (0.0, 0.0, 0.0)
    assert stats.probability_of_improvement(x, x).point == 0.5


def test_probability_of_improvement_known_value_with_ties():
    # Task 0: X wins 3 of 4 seeds; task 1: X wins 1, ties 1, loses 2 -> (0.75 + 0.375) / 2.
    x = np.array([[1.0, 1.0], [1.0, 0.5], [1.0, 0.0], [0.0, 0.0]])
    y = np.array([[0.0, 0.0], [0.0, 0.5], [0.0, 1.0], [1.0, 1.0]])
    est = stats.probability_of_improvement(x, y, n_boot=4000)
    assert est.point == pytest.approx(0.5625) and est.low < 0.5625 < est.high
    assert stats.probability_of_improvement(y, x).point == pytest.approx(1 - 0.5625)


def test_iqm_known_values():
    m = np.arange(1.0, 9.0).reshape(4, 2)  # trims 1, 2 and 7, 8: mean of 3..6
    assert stats.iqm(m) == 4.5
    m[3, 1] = 1000.0  # an outlier run moves the mean, not the IQM
    assert stats.iqm(m) == 4.5
    m = np.random.default_rng(0).random((5, 7))
    assert stats.iqm(m) == pytest.approx(trim_mean(m, 0.25, axis=None))


def test_iqm_ci_is_stratified_by_task():
    # Task 0 always 0, task 1 always 1: resampling seeds within each task keeps every resample
    # identical, so the CI collapses to the point; pooling runs across tasks would not.
    m = np.array([[0.0, 1.0]] * 4)
    assert tuple(stats.iqm_ci(m)) == (0.5, 0.5, 0.5)
    noisy = np.random.default_rng(2).random((10, 4))
    est = stats.iqm_ci(noisy)
    assert est.point == stats.iqm(noisy) and est.low < est.point < est.high


def test_paired_score_matrices_are_item_means_by_seed_and_task():
    x = {"a": {0: [1, 0], 1: [1, 1]}, "b": {0: [0, 0, 0], 1: [1, 0, 0]}}
    ref = {"a": {1: [0, 0], 0: [0, 1]}, "b": {0: [1, 1, 1], 1: [0, 0, 0]}}
    tasks, seeds, xs, rs = stats.paired_score_matrices(x, ref)
    assert tasks == ["a", "b"] and seeds == [0, 1]
    np.testing.assert_allclose(xs, [[0.5, 0.0], [1.0, 1 / 3]])
    np.testing.assert_allclose(rs, [[0.5, 1.0], [0.0, 0.0]])


# ---- errors -------------------------------------------------------------------------------------


def test_mismatched_seeds_are_named():
    named = r"seeds are not paired: only the controller has \[2\], only the reference has \[3\]"
    with pytest.raises(ValueError, match=named):
        stats.paired_difference({0: [1], 1: [0], 2: [1]}, {0: [1], 1: [0], 3: [1]})


def test_item_vectors_of_different_lengths_are_named():
    with pytest.raises(ValueError, match="reference seed 1 has 2 items, controller seed 0 has 3"):
        stats.paired_difference({0: [1, 0, 1], 1: [1, 1, 1]}, {0: [0, 0, 0], 1: [0, 0]})
    with pytest.raises(ValueError, match="controller seed 1 has 4 items"):
        stats.paired_difference({0: [1, 0, 1], 1: [1, 1, 1, 1]}, {0: [0, 0, 0], 1: [0, 0, 0]})


def test_a_ci_needs_two_seeds():
    with pytest.raises(ValueError, match="needs at least 2 seeds, got 1"):
        stats.paired_difference({0: [1, 0]}, {0: [0, 0]})
    with pytest.raises(ValueError, match="IQM CI needs at least 2 seeds"):
        stats.iqm_ci([[0.1, 0.2]])
    with pytest.raises(ValueError, match="probability-of-improvement CI needs at least 2 seeds"):
        stats.probability_of_improvement([[0.1]], [[0.2]])


def test_other_bad_input():
    with pytest.raises(ValueError, match="task 'b': seeds are not paired"):
        stats.compare_tasks({"a": {0: [1], 1: [0]}, "b": {0: [1]}},
                            {"a": {0: [1], 1: [0]}, "b": {1: [1]}})
    with pytest.raises(ValueError, match=r"tasks are not paired: only the controller has \['b'\]"):
        stats.compare_tasks({"a": {}, "b": {}}, {"a": {}})
    with pytest.raises(ValueError, match="task 'b' has seeds \\[0, 2\\], task 'a' has \\[0, 1\\]"):
        stats.paired_score_matrices({"a": {0: [1], 1: [0]}, "b": {0: [1], 2: [0]}},
                                    {"a": {0: [1], 1: [0]}, "b": {0: [1], 2: [0]}})
    with pytest.raises(ValueError, match="controller seed 0: the item vector holds NaN"):
        stats.paired_difference({0: [float("nan")], 1: [0]}, {0: [1], 1: [0]})
    with pytest.raises(ValueError, match="score matrices differ in shape"):
        stats.probability_of_improvement(np.zeros((3, 2)), np.zeros((3, 1)))
    with pytest.raises(ValueError, match=r"expected a non-empty \(n_seeds, n_tasks\) matrix"):
        stats.iqm([0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="p-values must be"):
        stats.holm([0.1, 1.5])
    with pytest.raises(ValueError, match="level must be in"):
        stats.paired_difference({0: [1], 1: [0]}, {0: [1], 1: [0]}, level=95)


def test_bootstrap_p_value_inverts_the_percentile_ci():
    assert stats.bootstrap_p_value([1.0, 2.0, 3.0]) == pytest.approx(2 * 1 / 4)
    assert stats.bootstrap_p_value([0.0] * 10) == 1.0
    assert stats.bootstrap_p_value([-1.0, 1.0]) == 1.0
    for p_x, p_ref, verdict in ((0.75, 0.3, "better"), (0.3, 0.75, "worse"),
                                (0.5, 0.5, "no difference")):
        d = stats.paired_difference(bernoulli_runs(p_x, seed=11), bernoulli_runs(p_ref, seed=12),
                                    n_boot=2000)
        assert d.verdict == verdict
        assert (d.p_boot < 0.05) == (verdict != "no difference")
    with pytest.raises(ValueError, match="bootstrap draws"):
        stats.bootstrap_p_value([])


def test_performance_profile_known_values_and_band():
    scores = np.array([[0.1, 0.5], [0.3, 0.7]])
    point, lo, hi = stats.performance_profile(scores, [0.0, 0.3, 0.6, 1.0], n_boot=500)
    assert point.tolist() == [1.0, 0.75, 0.25, 0.0]
    assert np.all(lo <= point) and np.all(point <= hi)
    assert (lo[0], hi[0], lo[-1], hi[-1]) == (1.0, 1.0, 0.0, 0.0)  # every resample agrees there
    # Seeds that agree leave nothing to resample: a zero-width band.
    same = np.array([[0.2, 0.8]] * 3)
    point, lo, hi = stats.performance_profile(same, [0.5], n_boot=200)
    assert point.tolist() == lo.tolist() == hi.tolist() == [0.5]
    with pytest.raises(ValueError, match="2 seeds"):
        stats.performance_profile(scores[:1], [0.5])


def test_the_seeds_x_items_bootstrap_with_one_item_per_seed_is_scipys_over_seeds():
    # scipy has no hierarchical (seeds, then items within a seed) bootstrap, so that one is ours.
    # With one item per seed the items add nothing: it is scipy's percentile bootstrap of the
    # per-seed differences, and it draws the very same seeds from the same generator.
    rng = np.random.default_rng(4)
    x = {s: [float(v)] for s, v in enumerate(rng.random(9))}
    ref = {s: [float(v)] for s, v in enumerate(rng.random(9))}
    ours = stats.paired_difference(x, ref, n_boot=5000, seed=11)
    diffs = np.array([x[s][0] - ref[s][0] for s in range(9)])
    ci = scipy.stats.bootstrap((diffs,), np.mean, n_resamples=5000, method="percentile",
                               rng=np.random.default_rng(11)).confidence_interval
    assert (ours.ci_low, ours.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-12)
    assert ours.mean_diff == pytest.approx(diffs.mean())
