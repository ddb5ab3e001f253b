"""The look every training-run chart shares (`core.viz.run_charts`, `core.viz.compare_charts`,
`core.viz.drift`): a method's colour (`METHOD_COLORS`; several runs of one method, such as
seeds, share the colour and differ in dash), the panel layout, a run's line and its interval
band, and the notes a chart attaches (`figure_notes`).

The charts read a run through `RunData`, the few things they draw from: the study layer's
`RunView` is one. They never import it: the viz layer sits below the study layer.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import pandas as pd
import plotly.graph_objects as go

from core.eval.labels import finite
from core.jobs.metrics import MetricRecord
from core.viz.style import FALLBACK_COLORS, _base_layout, empty_message


class RunData(Protocol):
    """What the run charts read of one run (a `RunView` of the study layer is one): its id,
    method and label, its config and metric records, and its frames: `train_frame` (step,
    loss), `eval_frame` (step, task, metric, value, n, role), `summary_frame` (step, BWT, TI
    and their bounds) and `changes` (each task's change from step 0 per round, with its paired
    interval: the study layer's `CHANGE_COLUMNS`); `target_task` is the (task, metric) TI reads."""

    @property
    def run_id(self) -> str: ...

    @property
    def method(self) -> str: ...

    @property
    def label(self) -> str: ...

    @property
    def config(self) -> Mapping[str, Any]: ...

    @property
    def records(self) -> Sequence[MetricRecord]: ...

    def train_frame(self) -> pd.DataFrame: ...

    def eval_frame(self) -> pd.DataFrame: ...

    def summary_frame(self) -> pd.DataFrame: ...

    def changes(self) -> pd.DataFrame: ...

    def target_task(self) -> tuple[str, str] | None: ...


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


def _styles(runs: Sequence[RunData]) -> dict[str, dict[str, str]]:
    seen: dict[str, int] = {}
    styles = {}
    for run in runs:
        k = seen.get(run.method, 0)
        seen[run.method] = k + 1
        styles[run.run_id] = {"color": method_color(run.method), "dash": DASHES[k % len(DASHES)]}
    return styles


def figure_notes(fig: go.Figure) -> list[str]:
    """The sentences a chart builder attached to its figure (`layout.meta["notes"]`): what the
    chart cannot show (no rounds yet, no interval, a run left out) and each run's last change
    with its interval. Pages show them as a caption under the chart, the report as a note."""
    meta = fig.layout.meta
    return list(meta.get("notes", [])) if isinstance(meta, dict) else []


#: characters a line of an empty chart's message holds (a panel's plot is about 200 px wide)
EMPTY_LINE_CHARS = 26


def _finish(
    fig: go.Figure, notes: Sequence[str], empty: str = "", *, panel: bool = False
) -> go.Figure:
    """Attach `notes`; with no data trace, say `empty` in the middle of the plot (a `panel`, a
    third of a 1280 px page wide: in lines short enough for it)."""
    fig.update_layout(meta={"notes": list(notes)})
    if empty and not any(t.meta and t.meta.get("role") == "line" for t in fig.data):
        empty_message(fig, "<br>".join(textwrap.wrap(empty, EMPTY_LINE_CHARS)) if panel else empty)
    return fig


PANEL_PLOT_PX = 250  # the plot area's height in a panel, whatever the legend takes below it


def _panel_layout(
    fig: go.Figure, title: str, x_title: str, y_title: str, better: str = ""
) -> go.Figure:
    """`_base_layout` for a chart a third of the page wide: the legend below the plot (one row
    per run, so it never covers the title), the figure as tall as the legend needs, and which
    way is better on a second line of the y-axis title."""
    _base_layout(fig, title, x_title, f"{y_title}<br>({better} is better)" if better else y_title)
    rows = sum(1 for t in fig.data if t.showlegend is not False)
    bottom = 64 + 22 * rows
    fig.update_layout(
        height=48 + PANEL_PLOT_PX + bottom,
        legend={
            "orientation": "h",
            "yref": "container",
            "yanchor": "bottom",
            "y": 0.0,
            "x": 0.0,
            "xanchor": "left",
            "font": {"size": 12},
        },
        margin={"l": 78, "r": 16, "t": 48, "b": bottom},
        title={"font": {"size": 15}},
    )
    fig.update_yaxes(title_font={"size": 12})
    fig.update_xaxes(title_font={"size": 12})
    fit_step_axis(fig)
    fig.update_layout(showlegend=rows > 0)  # also with one run: every panel lines up
    return fig


def fit_step_axis(fig: go.Figure) -> None:
    """An x axis of training steps fitted to the steps drawn: whole steps only (a tick per step
    over up to 10 steps), and a single round's axis half a step either side of it (plotly's own
    would run from step -1 to 1)."""
    steps = [float(x) for t in fig.data if t.x is not None for x in t.x if finite(x)]
    if not steps or not all(x.is_integer() for x in steps):
        return
    lo, hi = min(steps), max(steps)
    if hi - lo <= 10:  # a few steps: no ticks between them
        fig.update_xaxes(dtick=1, range=[lo - 0.5, hi + 0.5])
    else:
        fig.update_xaxes(tickformat="d", rangemode="nonnegative")


def _run_name(run: RunData) -> str:
    return f"{run.label} · {run.run_id}"


KL_AXIS = "token KL from base, nats"


def _band(
    fig: go.Figure,
    x: Sequence[Any],
    low: Sequence[Any],
    high: Sequence[Any],
    *,
    color: str,
    run: RunData,
) -> None:
    """The paired 95% interval as a shaded band under a run's line (`meta.role` "band")."""
    x, low, high = list(x), list(low), list(high)
    fig.add_trace(
        go.Scatter(
            x=[*x, *x[::-1]],
            y=[*high, *low[::-1]],
            mode="lines",
            fill="toself",
            fillcolor=_translucent(color),
            line={"width": 0},
            hoverinfo="skip",
            showlegend=False,
            legendgroup=run.run_id,
            name=f"{run.run_id} 95% interval",
            meta={"run": run.run_id, "method": run.method, "role": "band"},
        )
    )


def _line(
    fig: go.Figure,
    run: RunData,
    x: Sequence[Any],
    y: Sequence[Any],
    style: dict[str, str],
    hover: Sequence[str] | None = None,
    error_y: dict[str, Any] | None = None,
) -> None:
    """A run's line (`meta.role` "line"), hovering `hover` per point when given, with
    `error_y` bars when given."""
    extra: dict[str, Any] = (
        {}
        if hover is None
        else {"customdata": list(hover), "hovertemplate": "%{customdata}<extra></extra>"}
    )
    if error_y is not None:
        extra["error_y"] = error_y
    fig.add_trace(
        go.Scatter(
            x=list(x),
            y=list(y),
            mode="lines+markers",
            name=_run_name(run),
            line=style,
            legendgroup=run.run_id,
            meta={"run": run.run_id, "method": run.method, "role": "line"},
            **extra,
        )
    )


def _translucent(color: str, alpha: float = 0.15) -> str:
    """An rgba() of a "#rrggbb" colour (other colour strings pass through)."""
    if color.startswith("#") and len(color) == 7:
        r, g, b = (int(color[i : i + 2], 16) for i in (1, 3, 5))
        return f"rgba({r},{g},{b},{alpha})"
    return color


def _band_or_bars(
    fig: go.Figure,
    rows: pd.DataFrame,
    value: str,
    low: str,
    high: str,
    *,
    color: str,
    run: RunData,
) -> dict[str, Any] | None:
    """A run's 95% intervals over steps (`rows`: a "step" column and the `value`, `low` and
    `high` columns): a band under its line where two or more steps have one; one interval (a
    band needs two) is a bar on its point, returned as the line's `error_y`; else None."""
    bounded = rows[
        [finite(lo) and finite(hi) for lo, hi in zip(rows[low], rows[high], strict=True)]
    ]
    if len(bounded) >= 2:
        _band(fig, bounded["step"], bounded[low], bounded[high], color=color, run=run)
    elif len(bounded) == 1:
        return _point_bars(rows[value], rows[low], rows[high])
    return None


def _point_bars(values: pd.Series, low: pd.Series, high: pd.Series) -> dict[str, Any]:
    """`error_y` of a line: each point's 95% interval as a bar where it has one (0 elsewhere),
    for a run with too few intervals to draw a band."""
    up, down = [], []
    for v, lo, hi in zip(values, low, high, strict=True):
        bounded = finite(v) and finite(lo) and finite(hi)
        up.append(float(hi) - float(v) if bounded else 0.0)
        down.append(float(v) - float(lo) if bounded else 0.0)
    return {
        "type": "data",
        "symmetric": False,
        "thickness": 1.5,
        "width": 5,
        "array": up,
        "arrayminus": down,
    }
