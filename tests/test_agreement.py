"""Drift against a benchmark's change across a protocol's runs (core/study/agreement.py) and the
rank correlation behind it (core/stats.py)."""

import numpy as np
import pytest

from core.stats import rank_correlation
from core.study.agreement import agreement_sentence, drift_agreement


def _ranks_naive(values: list[float]) -> list[float]:
    return [
        sum(1 for w in values if w < v) + (sum(1 for w in values if w == v) + 1) / 2 for v in values
    ]


def test_rank_correlation_is_spearmans_rho_with_ties() -> None:
    x = [0.1, 0.4, 0.4, 0.2, 0.9, 0.3]
    y = [1.0, 3.0, 2.0, 2.0, 5.0, 0.5]
    rx, ry = _ranks_naive(x), _ranks_naive(y)
    want = float(np.corrcoef(rx, ry)[0, 1])
    rho = rank_correlation(x, y)
    assert rho.estimate == pytest.approx(want)
    assert rho.low is not None and rho.low <= rho.estimate <= rho.high


def test_rank_correlation_needs_four_pairs_and_two_values() -> None:
    assert rank_correlation([1, 2, 3], [1, 2, 3]).reason.startswith("too few")
    assert rank_correlation([1, 1, 1, 1], [1, 2, 3, 4]).reason == "one side is constant"
    perfect = rank_correlation([1, 2, 3, 4, 5, 6], [10, 20, 30, 40, 50, 60])
    assert perfect.estimate == pytest.approx(1.0)


def _run(arm: str, seed: int, kl: float, base: float, end: float) -> dict:
    return {
        "arm": arm,
        "label": arm.upper(),
        "seed": seed,
        "measures": {
            "ood:ood_drift:kl": kl,
            "ood:arc_easy:acc": end,
            "ood:arc_easy:acc:Δ%": 100 * (end - base) / base,
        },
    }


def test_runs_that_drift_more_and_lose_more_agree() -> None:
    runs = [
        _run("gt", 0, 0.20, 0.60, 0.57),
        _run("gt", 1, 0.15, 0.60, 0.58),
        _run("stm", 0, 0.08, 0.60, 0.60),
        _run("stm", 1, 0.07, 0.60, 0.605),
        _run("random", 0, 0.18, 0.60, 0.575),
        _run("random", 1, 0.12, 0.60, 0.59),
        {"arm": "gt", "seed": 2, "measures": {}},  # failed run: left out
    ]
    out = drift_agreement(runs)
    assert len(out["runs"]) == 6
    assert out["runs"][0]["points"] == pytest.approx(-3.0)
    assert out["rho"]["estimate"] == pytest.approx(1.0)
    assert out["order_by_drift"] == ["stm", "random", "gt"]
    assert out["order_by_benchmark"] == ["stm", "random", "gt"]
    text = agreement_sentence(out)
    assert "rho +1.00" in text and "the same order as by ARC-Easy" in text


def test_too_few_runs_say_so() -> None:
    assert drift_agreement([_run("gt", 0, 0.2, 0.6, 0.57)]) is None
    assert "fewer than two runs" in agreement_sentence(None)
