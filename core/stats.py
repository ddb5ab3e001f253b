"""Intervals a researcher can defend: paired over evaluation items, and over seeds and items.

Every comparison in Perplexity Lens (tuned vs base, step k vs step 0, arm vs arm) is paired:
both sides were scored on the same items. So the interval resamples ITEMS, the same indices
on both sides, and recomputes the statistic. Scores are ratio estimators: each item carries a
numerator and a denominator (accuracy: correct and 1; pooled NLL: the item's summed NLL and its
token count), so a pooled metric is resampled correctly.

- `paired_interval`: percentile bootstrap of a paired change (absolute, or relative in %).
- `hierarchical_interval`: seeds resampled, then items within each seed (the protocol's arms).
- `Interval.verdict`: "better" / "worse" only when the interval excludes zero; otherwise "no
  detectable difference", with the minimal detectable effect at this n (`detectable`).
- `mean_ci`: mean and Student-t interval over a handful of values (seeds).

Bootstraps are seeded (`seed`), so the same data always gives the same interval. Too few items
for an interval gives bounds of None and a `reason`, never NaN.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

LEVEL = 0.95
N_BOOT = 2000
MIN_ITEMS = 2
# Two-sided 95% Student t quantiles t(0.975, df) for df = 1..30; 1.96 beyond.
T_975 = (
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
Z_975, Z_80 = 1.959964, 0.841621  # two-sided 5% and one-sided 80% power quantiles


@dataclass(frozen=True)
class Interval:
    """A change with its interval. `estimate` is on the full data; `low` / `high` are None
    (with `reason`) when there are too few items. `detectable` is the smallest change of this
    kind the same n would detect (80% power, 5% two-sided), in the estimate's units."""

    estimate: float | None
    low: float | None
    high: float | None
    n: int
    level: float = LEVEL
    method: str = "paired bootstrap over items"
    detectable: float | None = None
    reason: str = ""

    @property
    def excludes_zero(self) -> bool:
        """The interval lies entirely above or below zero."""
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)

    def verdict(self, higher_is_better: bool = True) -> str:
        """ "better", "worse" or "no detectable difference" (the interval contains zero, or
        there is none)."""
        if not self.excludes_zero or self.estimate is None:
            return "no detectable difference"
        up = self.estimate > 0
        return "better" if up == higher_is_better else "worse"

    def describe(self, unit: str = "", digits: int = 1, higher_is_better: bool = True) -> str:
        """One line: the estimate, its interval and the verdict, e.g. "-3.2 [-5.1, -1.4]
        points: worse" or "+0.4 [-1.9, 2.6] points: no detectable difference (detectable:
        ±2.5)"."""
        if self.estimate is None:
            return self.reason or "not available"
        text = f"{self.estimate:+.{digits}f}"
        if self.low is None or self.high is None:
            return f"{text}{unit} ({self.reason or 'no interval'})"
        text += f" [{self.low:+.{digits}f}, {self.high:+.{digits}f}]{unit}"
        verdict = self.verdict(higher_is_better)
        if verdict == "no detectable difference" and self.detectable is not None:
            verdict += f" (detectable at n={self.n}: ±{self.detectable:.{digits}f}{unit})"
        return f"{text}: {verdict}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Sum of numerators over sum of denominators along the last axis (NaN where 0)."""
    total = den.sum(axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, num.sum(axis=-1) / np.where(total > 0, total, 1), np.nan)


def _change(base: np.ndarray, tuned: np.ndarray, relative: bool) -> np.ndarray:
    if not relative:
        return tuned - base
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(
            base != 0, 100.0 * (tuned - base) / np.abs(np.where(base != 0, base, 1)), np.nan
        )


def _as_items(items: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """(numerators, denominators) of items given as numbers (denominator 1) or pairs."""
    arr = np.asarray(items, dtype=np.float64)
    if arr.ndim == 1:
        return arr, np.ones_like(arr)
    return arr[:, 0], arr[:, 1]


Pair = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def _pair_change(pair: Pair, relative: bool, idx: np.ndarray | None = None) -> np.ndarray:
    """Change of one paired ratio metric, on all items or on the resampled indices `idx`
    (the same ones on both sides; a leading bootstrap axis gives one change per draw)."""
    (bn, bd), (tn, td) = pair
    if idx is not None:
        bn, bd, tn, td = bn[idx], bd[idx], tn[idx], td[idx]
    return _change(_ratio(bn, bd), _ratio(tn, td), relative)


def _from_draws(
    estimate: float, draws: np.ndarray, n: int, level: float, method: str, n_boot: int, why: str
) -> Interval:
    """The percentile interval of a bootstrap's finite draws (`why` explains too few of them)."""
    draws = draws[np.isfinite(draws)]
    if draws.size < n_boot // 2:
        return Interval(estimate, None, None, n, level, method, reason=why)
    alpha = (1.0 - level) / 2
    low, high = np.quantile(draws, [alpha, 1.0 - alpha])
    return Interval(estimate, float(low), float(high), n, level, method, detectable_effect(draws))


def paired_interval(
    base: Sequence[Any],
    tuned: Sequence[Any],
    *,
    relative: bool = False,
    scale: float = 1.0,
    n_boot: int = N_BOOT,
    seed: int = 0,
    level: float = LEVEL,
) -> Interval:
    """Change of a ratio metric from `base` to `tuned` on the same items (item i of one is item
    i of the other), with a percentile bootstrap interval over items. Items are numbers
    (accuracy: 0/1) or (numerator, denominator) pairs (pooled NLL: summed NLL, tokens).
    `relative`: in % of the base value; else absolute, times `scale` (100: points)."""
    if len(base) != len(tuned):
        raise ValueError(f"paired items differ in number: {len(base)} vs {len(tuned)}")
    n = len(base)
    if n == 0:
        return Interval(None, None, None, 0, level, reason="no items")
    pair = (_as_items(base), _as_items(tuned))
    factor = 1.0 if relative else scale
    estimate = float(_pair_change(pair, relative)) * factor
    if not math.isfinite(estimate):
        return Interval(None, None, None, n, level, reason="undefined: the base value is 0")
    if n < MIN_ITEMS:
        return Interval(estimate, None, None, n, level, reason=f"{n} item: too few for an interval")
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    draws = _pair_change(pair, relative, idx) * factor
    why = "unstable: the base value is often 0"
    return _from_draws(estimate, draws, n, level, "paired bootstrap over items", n_boot, why)


def detectable_effect(draws: np.ndarray) -> float:
    """The smallest true change the same design detects with 80% power at 5% two-sided:
    (z_0.975 + z_0.8) times the change's standard error (here, the bootstrap's spread)."""
    return float((Z_975 + Z_80) * np.std(draws, ddof=1))


def hierarchical_interval(
    base: Sequence[Sequence[Any]],
    tuned: Sequence[Sequence[Any]],
    *,
    relative: bool = False,
    scale: float = 1.0,
    n_boot: int = N_BOOT,
    seed: int = 0,
    level: float = LEVEL,
) -> Interval:
    """Mean change over seeds, each seed's runs paired on the same items (base[s][i] and
    tuned[s][i]): seeds are resampled, then items within each drawn seed, so the interval
    carries both sources of noise."""
    if len(base) != len(tuned) or not base:
        raise ValueError("need the same, non-zero number of seeds on both sides")
    pairs = [(_as_items(b), _as_items(t)) for b, t in zip(base, tuned, strict=True)]
    factor = 1.0 if relative else scale
    estimate = float(np.mean([float(_pair_change(pair, relative)) * factor for pair in pairs]))
    n_items = min(len(bn) for (bn, _), _ in pairs)
    method = "hierarchical bootstrap over seeds and items"
    if not math.isfinite(estimate):
        return Interval(
            None, None, None, n_items, level, method, reason="undefined: a base value is 0"
        )
    if n_items < MIN_ITEMS:
        return Interval(
            estimate, None, None, n_items, level, method, reason="too few items for an interval"
        )
    rng = np.random.default_rng(seed)
    draws = np.empty(n_boot)
    for k in range(n_boot):
        values = []
        for s in rng.integers(0, len(pairs), size=len(pairs)):
            size = len(pairs[s][0][0])
            values.append(_pair_change(pairs[s], relative, rng.integers(0, size, size=size)))
        draws[k] = float(np.mean(values)) * factor
    why = "unstable: a base value is often 0"
    return _from_draws(estimate, draws, n_items, level, method, n_boot, why)


def mean_of_paired_interval(
    tasks: Sequence[tuple[Sequence[Any], Sequence[Any]]],
    *,
    relative: bool = True,
    scale: float = 1.0,
    n_boot: int = N_BOOT,
    seed: int = 0,
    level: float = LEVEL,
) -> Interval:
    """Mean over tasks of each task's paired change (BWT: the mean relative change over the
    out-of-domain tasks), items resampled within each task on both sides at once."""
    if not tasks:
        return Interval(None, None, None, 0, level, reason="no tasks")
    pairs = [(_as_items(b), _as_items(t)) for b, t in tasks]
    factor = 1.0 if relative else scale
    per_task = [float(_pair_change(pair, relative)) * factor for pair in pairs]
    n = min(len(bn) for (bn, _), _ in pairs)
    if not all(math.isfinite(v) for v in per_task):
        return Interval(None, None, None, n, level, reason="undefined: a base value is 0")
    estimate = float(np.mean(per_task))
    if n < MIN_ITEMS:
        return Interval(estimate, None, None, n, level, reason="too few items for an interval")
    rng = np.random.default_rng(seed)
    total = np.zeros(n_boot)
    for pair in pairs:
        size = len(pair[0][0])
        total += _pair_change(pair, relative, rng.integers(0, size, size=(n_boot, size)))
    draws = total / len(pairs) * factor
    why = "unstable: a base value is often 0"
    return _from_draws(estimate, draws, n, level, "paired bootstrap over items", n_boot, why)


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


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), as Spearman's rho uses them."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    ranks[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = _ranks(x), _ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def rank_correlation(
    x: Sequence[float],
    y: Sequence[float],
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
    level: float = LEVEL,
) -> Interval:
    """Spearman's rho between paired values (e.g. one per run: drift and a benchmark's change),
    with a percentile bootstrap interval over the pairs. Fewer than 4 pairs, or a constant side,
    give bounds of None with a reason."""
    xs, ys = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xs.shape != ys.shape:
        raise ValueError("x and y need the same length")
    keep = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[keep], ys[keep]
    method = "Spearman's rho, bootstrap over pairs"
    n = int(xs.size)
    if n < 4:
        return Interval(None, None, None, n, level, method, reason="too few pairs (need 4)")
    estimate = _spearman(xs, ys)
    if not math.isfinite(estimate):
        return Interval(None, None, None, n, level, method, reason="one side is constant")
    rng = np.random.default_rng(seed)
    draws = np.array([_spearman(xs[i], ys[i]) for i in rng.integers(0, n, size=(n_boot, n))])
    return _from_draws(estimate, draws, n, level, method, n_boot, "too many constant resamples")
