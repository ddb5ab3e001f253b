"""Plotly builders that compare finished runs side by side (pure: tables in, `go.Figure` out):
the forgetting frontier (TI vs BWT), target gain vs drift, score vs % masked, and the
post-training diagnostics (LoRA weight change per layer, token perplexity change). Each point
is a run of a `runs_table` row, in its method's colour (`core.viz.run_style`); the frontiers
group runs by method and token loss ("stm + kl"), one marker symbol per loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from core import fmt
from core.eval.labels import (
    DRIFT_METRIC,
    OOD_DRIFT,
    finite,
    interval_text,
    metric_label,
    probe_noun,
    probe_title,
)
from core.fmt import value_text
from core.masking import DEFAULT_TAU
from core.viz.run_style import (
    KL_AXIS,
    _finish,
    _panel_layout,
    method_color,
)
from core.viz.style import _base_layout

#: The frontiers' marker per token loss (the colour is the method's).
LOSS_SYMBOLS = {
    "nll": "circle",
    "soft_stm": "diamond",
    "dft": "square",
    "eaft": "triangle-up",
    "kl": "x",
    "asft": "star",
}


def _setups(table: pd.DataFrame) -> pd.Series:
    """Each row's method, and its token loss when it is not nll ("stm + kl"): what a frontier's
    legend names and groups runs by (a table without a loss column: the method alone)."""
    losses = table["loss"] if "loss" in table.columns else [None] * len(table)
    return pd.Series(
        [
            str(m) if not isinstance(loss, str) or loss == "nll" else f"{m} + {loss}"
            for m, loss in zip(table["method"], losses, strict=True)
        ],
        index=table.index,
    )


def _marker(group: pd.DataFrame) -> dict[str, Any]:
    """A frontier group's marker: its method's colour, its loss's symbol."""
    loss = group["loss"].iloc[0] if "loss" in group.columns else None
    return {
        "size": 12,
        "color": method_color(str(group["method"].iloc[0])),
        "symbol": LOSS_SYMBOLS.get(loss if isinstance(loss, str) else "nll", "circle"),
    }


def _error_bars(values: pd.Series, low: pd.Series, high: pd.Series) -> dict[str, Any]:
    """Asymmetric error bars from each value to its interval's bounds (none where unknown)."""
    return {
        "type": "data",
        "symmetric": False,
        "thickness": 1.5,
        "width": 4,
        "array": [h - v if finite(h) else None for v, h in zip(values, high, strict=True)],
        "arrayminus": [v - lo if finite(lo) else None for v, lo in zip(values, low, strict=True)],
    }


def drift_frontier_chart(
    table: pd.DataFrame,
    drift: pd.DataFrame,
    missing: Mapping[str, str] | None = None,
    task: str = OOD_DRIFT,
) -> go.Figure:
    """Target gain against drift: each run's target Δ vs step 0 (x, from a `runs_table`, with its
    paired 95% interval) against its token KL from the base on the `task` probe at its latest
    drift round (y, from the study layer's `drift_table`, with its 95% interval over probe items),
    error bars both ways, one marker per run labelled by its method and token loss. Runs without a drift round
    after step 0 are left out and named in the notes, with the reason `missing` gives (run id ->
    why)."""
    fig = go.Figure()
    notes: list[str] = []
    missing = dict(missing or {})
    kl = pd.DataFrame()
    if not drift.empty:
        kl = drift[(drift["task"] == task) & (drift["metric"] == DRIFT_METRIC)]
    by_run = {str(r["run"]): r for _, r in kl.iterrows()}
    rows: list[dict[str, Any]] = []
    left_out: dict[str, list[str]] = {}
    unit = None
    title = probe_title(task)
    for _, row in table.iterrows() if not table.empty else ():
        name = f"{row['label']} · {row['run']}"
        found = by_run.get(str(row["run"]))
        if found is None:
            why = missing.get(str(row["run"]), f"no {probe_noun(task)} measured after step 0")
            left_out.setdefault(why, []).append(name)
            continue
        if not finite(row.get("target Δ")):
            left_out.setdefault("no target change yet", []).append(name)
            continue
        unit = unit or str(row.get("target Δ unit") or "")
        if str(row.get("target Δ unit") or "") != unit:
            left_out.setdefault(f"its target Δ is not in {unit} like the others", []).append(name)
            continue
        rows.append(
            {
                "run": row["run"],
                "label": row["label"],
                "method": row["method"],
                "loss": row.get("loss"),
                "target": row.get("target"),
                "x": float(row["target Δ"]),
                "x_low": row.get("target Δ low"),
                "x_high": row.get("target Δ high"),
                "y": float(found["value"]),
                "y_low": found["low"],
                "y_high": found["high"],
                "step": int(found["step"]),
            }
        )
    data = pd.DataFrame(rows)
    for setup, group in data.groupby(_setups(data), sort=False) if not data.empty else ():
        hover = [
            f"{r.label} · {r.run}<br>target Δ {interval_text(r.x, r.x_low, r.x_high, unit)}<br>"
            f"{title} at step {r.step}: KL {value_text(r.y, r.y_low, r.y_high, 'nats')}"
            for r in group.itertuples()
        ]
        fig.add_trace(
            go.Scatter(
                x=group["x"].tolist(),
                y=group["y"].tolist(),
                mode="markers+text",
                name=str(setup),
                text=group["label"].tolist(),
                # beside the point, not centred over it: a centred label sits on the
                # vertical error bar and hides the interval it belongs to
                textposition="top right",
                marker=_marker(group),
                customdata=hover,
                hovertemplate="%{customdata}<extra></extra>",
                error_x=_error_bars(group["x"], group["x_low"], group["x_high"]),
                error_y=_error_bars(group["y"], group["y_low"], group["y_high"]),
                meta={"role": "line", "runs": list(group["run"])},
            )
        )
    for why, names in left_out.items():
        notes.append(f"Not drawn, {why}: {', '.join(names)}.")
    no_interval = [
        f"{r.label} · {r.run}"
        for r in data.itertuples()
        if not all(finite(v) for v in (r.x_low, r.x_high, r.y_low, r.y_high))
    ]
    if no_interval:
        notes.append(
            "No interval (too few items or no per-item scores) for: " + ", ".join(no_interval) + "."
        )
    if len(data) == 1:
        notes.insert(
            0,
            "One run: its point with the 95% intervals of its target change and its "
            "drift. A comparison needs a second run.",
        )
    accuracy = unit == "points"
    target = data["target"].iloc[0] if not data.empty else ""
    target = target if isinstance(target, str) else ""
    x_title = f"target Δ{f' ({target})' if target else ''}, {unit or 'vs step 0'}"
    x_title += " (right is better)" if accuracy else (" (left is better)" if unit else "")
    fig.add_vline(x=0, line={"color": "#9ca3af", "width": 1})
    _base_layout(
        fig,
        f"Target gain vs {probe_noun(task)}",
        x_title,
        f"{title}: {KL_AXIS}<br>(lower: closer to the base)",
    )
    if not data.empty:
        top = max(float(v) for v in (*data["y"], *data["y_high"]) if finite(v))
        fig.update_yaxes(range=[0.0, 1.15 * top if top > 0 else 1.0], rangemode="tozero")
    return _finish(fig, notes, f"No run has both a target change and {probe_noun(task)} yet.")


def _column(table: pd.DataFrame, name: str) -> pd.Series:
    return (
        table[name] if name in table.columns else pd.Series([None] * len(table), index=table.index)
    )


def frontier_chart(table: pd.DataFrame) -> go.Figure:
    """Forgetting frontier: target change (TI, %) vs out-of-domain change (BWT, %) per run, with
    their paired 95% intervals as error bars in both directions, one trace per method and token
    loss ("stm + kl"). One run is drawn on its own (its point and intervals), with a note that
    a comparison needs a second run."""
    fig = go.Figure()
    notes: list[str] = []
    data = pd.DataFrame()
    if not table.empty and {"TI", "BWT"} <= set(table.columns):
        data = table[
            [finite(t) and finite(b) for t, b in zip(table["TI"], table["BWT"], strict=True)]
        ]
        for row in table.drop(index=data.index).itertuples():
            why = [
                n
                for n in str(getattr(row, "notes", "") or "").split(". ")
                if n.startswith(("BWT undefined", "TI undefined", "TI:"))
            ]
            missing = " and ".join(
                n for n, v in (("TI", row.TI), ("BWT", row.BWT)) if not finite(v)
            )
            reason = ". ".join(why).rstrip(".") if why else "see the run's notes"
            notes.append(f"{row.label} · {row.run}: not drawn, no {missing} ({reason}).")
    for setup, group in data.groupby(_setups(data), sort=False) if not data.empty else ():
        bwt, ti = group["BWT"].astype(float), group["TI"].astype(float)
        bars = {}
        for axis, value, name in (("error_x", bwt, "BWT"), ("error_y", ti, "TI")):
            low, high = _column(group, f"{name} low"), _column(group, f"{name} high")
            bars[axis] = {
                "type": "data",
                "symmetric": False,
                "thickness": 1.5,
                "width": 4,
                "array": [h - v if finite(h) else None for v, h in zip(value, high, strict=True)],
                "arrayminus": [
                    v - lo if finite(lo) else None for v, lo in zip(value, low, strict=True)
                ],
            }
        hover = [
            f"{label} · {run}<br>BWT {interval_text(b, bl, bh, '%')}<br>"
            f"TI {interval_text(t, tl, th, '%')}"
            for label, run, b, bl, bh, t, tl, th in zip(
                group["label"],
                group["run"],
                bwt,
                _column(group, "BWT low"),
                _column(group, "BWT high"),
                ti,
                _column(group, "TI low"),
                _column(group, "TI high"),
                strict=True,
            )
        ]
        fig.add_trace(
            go.Scatter(
                x=bwt.tolist(),
                y=ti.tolist(),
                mode="markers",
                name=str(setup),
                marker=_marker(group),
                customdata=hover,
                hovertemplate="%{customdata}<extra></extra>",
                meta={"role": "line", "runs": list(group["run"])},
                **bars,
            )
        )
    no_interval = [
        f"{row['label']} · {row['run']}"
        for _, row in data.iterrows()
        if not all(finite(row.get(c)) for c in ("BWT low", "BWT high", "TI low", "TI high"))
    ]
    if no_interval:
        notes.append(
            "No interval (too few items or no per-item scores) for: " + ", ".join(no_interval) + "."
        )
    if len(data) == 1:
        notes.insert(
            0,
            "One run: its point with the paired 95% intervals of TI and BWT (each "
            "against its own step 0). A comparison needs a second run.",
        )
    fig.add_hline(y=0, line={"color": "#9ca3af", "width": 1})
    fig.add_vline(x=0, line={"color": "#9ca3af", "width": 1})
    _base_layout(
        fig,
        "Forgetting frontier (up and right is better)",
        "BWT: out-of-domain change %",
        "TI: target change %",
    )
    return _finish(fig, notes, "No run has both TI and BWT yet.")


def _score_name(column: str) -> str:
    """A runs table's "task metric" column as a reader names it ("mbpp_ppl NLL per token")."""
    task, _, metric = column.partition(" ")
    return metric_label(task, metric) if metric else column


def score_vs_masked_chart(table: pd.DataFrame, columns: Sequence[str]) -> go.Figure:
    """Scores vs % of response tokens masked in training, one line per task (a τ sweep)."""
    fig = go.Figure()
    if not table.empty and "masked %" in table.columns:
        data = table.copy()
        data["masked %"] = data["masked %"].fillna(0.0)
        data = data.sort_values("masked %")
        for column in columns:
            if column not in data.columns:
                continue
            part = data.dropna(subset=[column])
            fig.add_trace(
                go.Scatter(
                    x=part["masked %"],
                    y=part[column],
                    mode="lines+markers",
                    name=_score_name(column),
                    text=part["label"],
                )
            )
    return _panel_layout(fig, "Score vs % tokens masked", "% response tokens masked", "score")


LORA_COLUMNS = {"fro_norm": "‖ΔW‖_F", "effective_rank": "effective rank"}


def lora_chart(stats: pd.DataFrame, column: str) -> go.Figure:
    """One LoRA weight-change statistic (the study layer's `lora_weight_stats`) per layer, a bar
    per adapted module kind."""
    fig = go.Figure()
    for kind, group in stats.groupby("kind", sort=True):
        fig.add_trace(go.Bar(x=group["layer"], y=group[column], name=str(kind)))
    fig.update_layout(barmode="group")
    title = LORA_COLUMNS.get(column, column)
    return _base_layout(fig, f"{title} per layer", "layer", title)


def ppl_change_histogram(frame: pd.DataFrame, tau: float = DEFAULT_TAU) -> go.Figure:
    """Distribution of the per-token change Δ ln ppl (fine-tuned − original), split by whether
    the original model found the token easy (ppl ≤ τ) or surprising (ppl > τ)."""
    fig = go.Figure()
    groups = (
        ("easy", f"base ppl ≤ {fmt.tau(tau)}", "#0072B2"),
        ("hard", f"base ppl > {fmt.tau(tau)}", "#D55E00"),
    )
    bins = None  # one set of bins for both groups, so their bars line up
    if not frame.empty:
        lo, hi = float(frame["delta"].min()), float(frame["delta"].max())
        bins = {"start": lo, "end": hi + 1e-9, "size": max(hi - lo, 1e-6) / 40}
    for name, label, color in groups:
        part = frame[frame["base_easy"] == (name == "easy")] if not frame.empty else frame
        if part.empty:
            continue
        fig.add_trace(
            go.Histogram(
                x=part["delta"],
                name=f"{label} ({len(part)} tokens)",
                marker_color=color,
                opacity=0.7,
                xbins=bins,
                meta={"group": name},
            )
        )
    fig.update_layout(barmode="overlay")
    fig.add_vline(x=0, line={"color": "#9ca3af", "width": 1})
    return _base_layout(
        fig,
        "Token perplexity change after fine-tuning",
        "Δ ln ppl (< 0: easier, > 0: harder)",
        "tokens",
    )
