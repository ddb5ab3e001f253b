"""Statistics for comparisons: means and intervals."""

from __future__ import annotations

import math
from collections.abc import Sequence

# Two-sided 95% Student t quantiles t(0.975, df) for df = 1..30; 1.96 beyond.
T_975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


# --------------------------------------------------------------------------- aggregation


def mean_ci(values: Sequence[float]) -> dict[str, float | int | None]:
    """Mean, sample standard deviation and 95% CI half-width (Student t) of `values`."""
    clean = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    n = len(clean)
    if n == 0:
        return {"n": 0, "mean": None, "sd": None, "ci95": None}
    mean = sum(clean) / n
    if n == 1:
        return {"n": 1, "mean": mean, "sd": None, "ci95": None}
    sd = math.sqrt(sum((v - mean) ** 2 for v in clean) / (n - 1))
    t = T_975[n - 2] if n - 1 <= len(T_975) else 1.96
    return {"n": n, "mean": mean, "sd": sd, "ci95": t * sd / math.sqrt(n)}
