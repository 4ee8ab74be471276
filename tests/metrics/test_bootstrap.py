import numpy as np

from clrface.metrics.bootstrap import bootstrap_ci, paired_diff_ci, paired_set_diff_ci


def test_bootstrap_ci_matches_the_normal_interval_of_a_mean():
    v = np.random.default_rng(1).normal(0.5, 0.1, 500)
    lo, hi = bootstrap_ci(v)
    half = 1.96 * v.std(ddof=1) / np.sqrt(len(v))  # 0.0088
    assert lo < v.mean() < hi
    assert abs((hi - lo) / 2 - half) < 0.15 * half


def test_bootstrap_ci_of_a_constant_is_a_point_and_nans_are_dropped():
    assert bootstrap_ci([0.25] * 10 + [float("nan")]) == (0.25, 0.25)
    lo, hi = bootstrap_ci([])
    assert np.isnan(lo) and np.isnan(hi)


def test_paired_difference_sees_a_shift_hidden_in_the_spread():
    rng = np.random.default_rng(2)
    a = rng.normal(0.9, 0.05, 500)
    b = a - 0.002 + rng.normal(0, 0.001, 500)  # per-face gain 0.002, far below the spread of a
    mean, lo, hi = paired_diff_ci(a, b)
    assert abs(mean - 0.002) < 2e-4 and lo > 0
    lo_a, hi_a = bootstrap_ci(a)
    assert hi_a - lo_a > 0.002  # the unpaired intervals would overlap


def test_paired_set_statistic_difference():
    rng = np.random.default_rng(3)
    a = rng.normal(0, 1, (300, 2))
    diff, lo, hi = paired_set_diff_ci(lambda f: float(f[:, 0].std()), a * 1.1, a, resamples=300)
    assert abs(diff - 0.1 * a[:, 0].std()) < 1e-12 and 0 < lo < diff < hi  # the same faces: a tight interval
    diff, lo, hi = paired_set_diff_ci(lambda f: float(f.mean()), a, a.copy(), resamples=50)
    assert diff == lo == hi == 0.0
