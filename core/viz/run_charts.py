"""Plotly builders for training runs (pure: RunView / tables in, `go.Figure` out).

Each method keeps one colour everywhere (`METHOD_COLORS`); several runs of one method (seeds)
share the colour and differ in dash. Used by the Runs and Compare pages and by the HTML report.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
import plotly.graph_objects as go

from core.jobs.metrics import StartRecord, as_records, loss_by_step, of_kind
from core.masking import DEFAULT_TAU
from core.viz.charts import FALLBACK_COLORS, _base_layout

if TYPE_CHECKING:  # only for annotations: core.viz sits below core.study
    from core.study.runs import RunView

METHOD_COLORS: dict[str, str] = {
    "base": "#6b7280",
    "gt": "#D55E00",
    "stm": "#0072B2",
    "random": "#E69F00",
    "low": "#CC79A7",
    "percentile": "#56B4E9",
    "self_output": "#009E73",
    "rephrase": "#7F3C8D",
}
DASHES = ("solid", "dash", "dot", "dashdot", "longdash")


def method_color(method: str) -> str:
    """Colour of a training method, the same in every chart."""
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    return FALLBACK_COLORS[sum(map(ord, method)) % len(FALLBACK_COLORS)]


def _styles(runs: Sequence[RunView]) -> dict[str, dict[str, str]]:
    seen: dict[str, int] = {}
    styles = {}
    for run in runs:
        k = seen.get(run.method, 0)
        seen[run.method] = k + 1
        styles[run.run_id] = {"color": method_color(run.method), "dash": DASHES[k % len(DASHES)]}
    return styles


def loss_chart(runs: Sequence[RunView]) -> go.Figure:
    """Training loss over steps, one line per run."""
    fig = go.Figure()
    styles = _styles(runs)
    for run in runs:
        frame = run.train_frame()
        if frame.empty:
            continue
        fig.add_trace(
            go.Scatter(
                x=frame["step"], y=frame["loss"], mode="lines", name=f"{run.label} · {run.run_id}",
                line=styles[run.run_id], meta={"run": run.run_id, "method": run.method},
            )
        )  # fmt: skip
    return _base_layout(fig, "Training loss", "step", "loss")


def metric_chart(runs: Sequence[RunView], task: str, metric: str | None = None) -> go.Figure:
    """One evaluation metric over steps (step 0 = the base model), one line per run."""
    fig = go.Figure()
    styles = _styles(runs)
    for run in runs:
        frame = run.eval_frame()
        frame = frame[frame["task"] == task]
        if metric is not None:
            frame = frame[frame["metric"] == metric]
        if frame.empty:
            continue
        name = metric or str(frame["metric"].iloc[0])
        frame = frame[frame["metric"] == name].sort_values("step")
        fig.add_trace(
            go.Scatter(
                x=frame["step"], y=frame["value"], mode="lines+markers",
                name=f"{run.label} · {run.run_id}", line=styles[run.run_id],
                meta={"run": run.run_id, "method": run.method},
            )
        )  # fmt: skip
    label = f"{task} {metric or ''}".strip()
    return _base_layout(fig, label, "step", metric or "score")


def _translucent(color: str, alpha: float = 0.15) -> str:
    """An rgba() of a "#rrggbb" colour (other colour strings pass through)."""
    if color.startswith("#") and len(color) == 7:
        r, g, b = (int(color[i : i + 2], 16) for i in (1, 3, 5))
        return f"rgba({r},{g},{b},{alpha})"
    return color


def bwt_chart(runs: Sequence[RunView]) -> go.Figure:
    """Backward transfer (mean relative change on out-of-domain tasks, %) over steps, with the
    paired 95% interval over items as a band where the run has one."""
    fig = go.Figure()
    styles = _styles(runs)
    for run in runs:
        frame = run.summary_frame().dropna(subset=["bwt"])
        if frame.empty:
            continue
        band = frame.dropna(subset=["bwt_low", "bwt_high"])
        if not band.empty:  # the paired 95% interval over items, as a shaded band
            color = styles[run.run_id].get("color", "#6b7280")
            fig.add_trace(
                go.Scatter(
                    x=[*band["step"], *band["step"][::-1]],
                    y=[*band["bwt_high"], *band["bwt_low"][::-1]],
                    fill="toself", fillcolor=_translucent(color), line={"width": 0},
                    hoverinfo="skip", showlegend=False, name=f"{run.run_id} 95% interval",
                )
            )  # fmt: skip
        fig.add_trace(
            go.Scatter(
                x=frame["step"], y=frame["bwt"], mode="lines+markers",
                name=f"{run.label} · {run.run_id}", line=styles[run.run_id],
                meta={"run": run.run_id, "method": run.method},
            )
        )  # fmt: skip
    fig.add_hline(y=0, line={"color": "#9ca3af", "width": 1})
    return _base_layout(fig, "Out-of-domain change (BWT, %)", "step", "BWT %")


def frontier_chart(table: pd.DataFrame) -> go.Figure:
    """Forgetting frontier: target change (TI, %) vs out-of-domain change (BWT, %) per run."""
    fig = go.Figure()
    if not table.empty and {"TI", "BWT"} <= set(table.columns):
        data = table.dropna(subset=["TI", "BWT"])
        for method, group in data.groupby("method", sort=False):
            fig.add_trace(
                go.Scatter(
                    x=group["BWT"], y=group["TI"], mode="markers", name=str(method),
                    marker={"size": 12, "color": method_color(str(method))},
                    text=group["label"] + " · " + group["run"],
                    hovertemplate="%{text}<br>BWT %{x:.2f}%<br>TI %{y:.2f}%<extra></extra>",
                )
            )  # fmt: skip
    fig.add_hline(y=0, line={"color": "#9ca3af", "width": 1})
    fig.add_vline(x=0, line={"color": "#9ca3af", "width": 1})
    return _base_layout(
        fig, "Forgetting frontier (up and right is better)", "BWT: out-of-domain change %",
        "TI: target change %",
    )  # fmt: skip


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
                    x=part["masked %"], y=part[column], mode="lines+markers", name=column,
                    text=part["label"],
                )
            )  # fmt: skip
    return _base_layout(fig, "Score vs % tokens masked", "% response tokens masked", "score")


LORA_COLUMNS = {"fro_norm": "‖ΔW‖_F", "effective_rank": "effective rank"}


def lora_chart(stats: pd.DataFrame, column: str) -> go.Figure:
    """One LoRA weight-change statistic (`core.study.diagnostics.lora_weight_stats`) per layer, a bar
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
        ("easy", f"base ppl ≤ {tau:g}", "#0072B2"),
        ("hard", f"base ppl > {tau:g}", "#D55E00"),
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
                x=part["delta"], name=f"{label} ({len(part)} tokens)", marker_color=color,
                opacity=0.7, xbins=bins, meta={"group": name},
            )
        )  # fmt: skip
    fig.update_layout(barmode="overlay")
    fig.add_vline(x=0, line={"color": "#9ca3af", "width": 1})
    return _base_layout(
        fig, "Token perplexity change after fine-tuning", "Δ ln ppl (< 0: easier, > 0: harder)",
        "tokens",
    )  # fmt: skip


def training_loss_figure(records: Sequence[Any]) -> go.Figure:
    """One run's training loss per step (the latest record per step wins, so a resumed run is
    clean), with a dotted line where it resumed."""
    by_step = loss_by_step(records)
    steps = sorted(by_step)
    fig = go.Figure(
        go.Scatter(x=steps, y=[by_step[s] for s in steps], mode="lines+markers", name="loss")
    )
    for start in of_kind(as_records(records), StartRecord):
        if start.step:
            fig.add_vline(x=start.step, line_dash="dot", annotation_text="resumed")
    fig.update_layout(
        height=320,
        margin=dict(l=10, r=10, t=40, b=10),
        title="Training loss (trained tokens only)",
        xaxis_title="step",
        yaxis_title="loss",
    )
    return fig
