"""Bootstrap 95 % intervals for per-face means: a difference between two rows means something only when it
is larger than these intervals (or when the paired interval of the difference excludes 0)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def bootstrap_ci(values: Sequence[float] | np.ndarray, *, resamples: int = 2000, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` [N]: (low, high). NaNs are dropped."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if len(v) == 0:
        return float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, len(v), size=(resamples, len(v)))
    means = v[idx].mean(1)
    tail = (1 - level) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def paired_diff_ci(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
                   **kw) -> tuple[float, float, float]:
    """Mean of ``a - b`` over the same faces and its bootstrap interval: (mean, low, high)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    lo, hi = bootstrap_ci(d, **kw)
    return float(np.nanmean(d)), lo, hi


def paired_set_diff_ci(stat: Callable[[np.ndarray], float], a: np.ndarray, b: np.ndarray, *, resamples: int = 1000,
                       seed: int = 0, level: float = 0.95) -> tuple[float, float, float]:
    """``stat(a) - stat(b)`` for a statistic of a whole set (FID of feature rows), row i of ``a`` and ``b`` the
    same face, and its percentile bootstrap interval from resampling faces (the same draw for both):
    (difference, low, high)."""
    a, b = np.asarray(a), np.asarray(b)
    if len(a) != len(b):
        raise ValueError(f"paired sets need the same faces, got {len(a)} and {len(b)} rows")
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(resamples):
        i = rng.integers(0, len(a), len(a))
        diffs.append(stat(a[i]) - stat(b[i]))
    tail = (1 - level) / 2
    return float(stat(a) - stat(b)), float(np.quantile(diffs, tail)), float(np.quantile(diffs, 1 - tail))
