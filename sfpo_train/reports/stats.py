"""Means over seeds with 95% confidence intervals (Student's t), for the reports' summary tables.

``mean_ci(values)``: the mean of n values and the two-sided 95% t interval
``mean -+ t(0.975, n - 1) * s / sqrt(n)``, ``s`` the sample standard deviation
(n - 1 in the denominator). With one value there is no interval (NaN bounds).
The t quantiles for 1..30 degrees of freedom are the standard table values; above
30 the Cornish-Fisher expansion of the t quantile around the normal one (error
< 1e-4 there). Seeds are few (3-10), so the t interval, not a bootstrap: a
bootstrap of 5 values has only 126 distinct resamples and understates the spread.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

# t(0.975, df) for df = 1..30
T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)
Z975 = 1.959964
INTERVAL = "95% t interval over seeds: mean -+ t(0.975, n-1) s/sqrt(n), none with one seed"


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` >= 1 degrees of freedom."""
    if df < 1:
        raise ValueError(f"df must be >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = Z975
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def mean_ci(values: Iterable[float]) -> tuple[float, float, float, int]:
    """``(mean, ci_low, ci_high, n)`` over the finite ``values``; NaN mean with none, NaN bounds with one."""
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(xs)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    mean = math.fsum(xs) / n
    if n == 1:
        return mean, math.nan, math.nan, 1
    s = math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t975(n - 1) * s / math.sqrt(n)
    return mean, mean - half, mean + half, n
