"""Statistics shared by the overhead benches (imported as `from paired_stats import ...`: scripts run from bench/)."""

from __future__ import annotations

import numpy as np


def median_ci(values: list[float], rng: np.random.Generator, n_boot: int = 4000) -> tuple[float, float, float]:
    """Median and a 95 % CI of the median from a moving-block bootstrap over the values in time order: neighbouring
    runs share the host's drift (and, in kernel_overhead_bench, a `none` chunk), so they are not independent (a plain
    bootstrap put an A/A control's CI off zero)."""
    a = np.asarray(values, dtype=float)
    n = a.size
    block = max(1, min(n, round(n ** (1 / 3))))
    starts = rng.integers(0, n - block + 1, (n_boot, -(-n // block)))
    idx = (starts[:, :, None] + np.arange(block)).reshape(n_boot, -1)[:, :n]
    lo, hi = np.percentile(np.median(a[idx], axis=1), [2.5, 97.5])
    return float(np.median(a)), float(lo), float(hi)
