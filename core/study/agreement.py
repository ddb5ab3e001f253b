"""How well drift from the base model and a benchmark's change agree across a protocol's runs.

Each finished run of a protocol (an arm and a seed) gives one pair: its OOD drift at the end
(mean token KL(base || tuned) on the OOD probe) and the change of an accuracy benchmark against
its own step 0 (ARC-Easy on the cpu preset), in points. If both measure forgetting, the runs
that drift more should lose more accuracy: Spearman's rho between the drift and the accuracy
*loss* is then positive. The interval is a bootstrap over runs, so with a dozen runs it is wide;
the arms' orders by each measure are given too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from core import fmt
from core.stats import rank_correlation

#: The drift measure of a run (core.study.protocol.run_measures) and the benchmark measured.
DRIFT_MEASURE = "ood:ood_drift:kl"
BENCHMARK = "ood:arc_easy:acc"


def _points(measures: dict[str, Any], benchmark: str) -> float | None:
    """The benchmark's change against the run's step 0, in points (from the end value and its
    relative change)."""
    end, rel = measures.get(benchmark), measures.get(f"{benchmark}:Δ%")
    if end is None or rel is None or rel <= -100:
        return None
    base = end / (1 + rel / 100)
    return 100 * (end - base)


def drift_agreement(
    per_run: Sequence[dict[str, Any]],
    *,
    drift: str = DRIFT_MEASURE,
    benchmark: str = BENCHMARK,
) -> dict[str, Any] | None:
    """Per run (arm, seed): the drift and the benchmark's change in points; Spearman's rho between
    drift and the benchmark's loss over runs, with its interval; each arm's mean of both and the
    arms ordered by each. None when fewer than two runs have both."""
    rows = []
    for entry in per_run:
        measures = entry.get("measures") or {}
        kl, points = measures.get(drift), _points(measures, benchmark)
        if kl is None or points is None:
            continue
        rows.append(
            {
                "arm": entry["arm"],
                "label": entry.get("label", entry["arm"]),
                "seed": entry["seed"],
                "drift": float(kl),
                "points": float(points),
            }
        )
    if len(rows) < 2:
        return None
    rho = rank_correlation([r["drift"] for r in rows], [-r["points"] for r in rows])
    arms: dict[str, dict[str, Any]] = {}
    for row in rows:
        arm = arms.setdefault(row["arm"], {"label": row["label"], "drift": [], "points": []})
        arm["drift"].append(row["drift"])
        arm["points"].append(row["points"])
    means = {
        key: {
            "label": a["label"],
            "runs": len(a["drift"]),
            "drift": sum(a["drift"]) / len(a["drift"]),
            "points": sum(a["points"]) / len(a["points"]),
        }
        for key, a in arms.items()
    }
    return {
        "drift": drift,
        "benchmark": benchmark,
        "runs": rows,
        "rho": rho.to_dict(),
        "arms": means,
        # least forgetting first by each measure: least drift, most accuracy kept
        "order_by_drift": sorted(means, key=lambda k: means[k]["drift"]),
        "order_by_benchmark": sorted(means, key=lambda k: -means[k]["points"]),
    }


def agreement_sentence(agreement: dict[str, Any] | None) -> str:
    """One plain sentence: does drift rank the runs as the benchmark's change does?"""

    if not agreement:
        return "Drift and the benchmark cannot be compared: fewer than two runs measured both."
    rho = agreement["rho"]
    n = rho["n"]
    if rho["estimate"] is None:
        return f"Drift and ARC-Easy over {n} runs: no rank correlation ({rho['reason']})."
    text = f"Over {n} runs, drift and ARC-Easy loss rank-correlate at rho {fmt.signed(rho['estimate'])}"
    if rho["low"] is not None:
        text += f" [{fmt.signed(rho['low'])}, {fmt.signed(rho['high'])}]"
        if rho["low"] > 0:
            text += ": the runs that drift more lose more accuracy"
        elif rho["high"] < 0:
            text += ": the runs that drift more lose less accuracy"
        else:
            text += ": no detectable agreement at this many runs"
    same = agreement["order_by_drift"] == agreement["order_by_benchmark"]
    names = {k: v["label"] for k, v in agreement["arms"].items()}
    order = " < ".join(names[k] for k in agreement["order_by_drift"])
    text += f". Arms by drift (least first): {order}; "
    text += (
        "the same order as by ARC-Easy."
        if same
        else ("by ARC-Easy: " + " < ".join(names[k] for k in agreement["order_by_benchmark"]) + ".")
    )
    return text
