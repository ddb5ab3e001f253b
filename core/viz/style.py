"""The look every chart shares: each data source's colour and label, the white layout
(`_base_layout`), the PNG download settings (`PLOTLY_CONFIG`), the τ lines and the log axes
with readable ticks. The builders live in `core.viz.charts` (token perplexity),
`core.viz.masking_charts` (masked share), `core.viz.run_charts` and `core.viz.compare_charts`
(training runs) and `core.viz.drift`.

Each data source keeps one colour in every chart (`SOURCE_COLORS`; unknown sources get a
stable colour from `FALLBACK_COLORS` picked by a hash of their name, so it does not change with
the order in which sources appear). Trace names are the sources' display labels
(`source_label`, from `core.scoring.analytics`, where tables name them too); the raw key is
kept in `trace.meta["source"]`.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from core import fmt

# Okabe-Ito colour-blind-safe palette: GT is the "hot" one, Self-Output the calm one.
SOURCE_COLORS: dict[str, str] = {
    "ground_truth": "#D55E00",
    "self_output": "#0072B2",
    "rephrase": "#009E73",
    "generated": "#CC79A7",
}
FALLBACK_COLORS: tuple[str, ...] = (
    "#E69F00",
    "#56B4E9",
    "#7F3C8D",
    "#3B3B3B",
    "#A5AA99",
    "#B8860B",
    "#1D6996",
    "#94346E",
)
TAU_COLOR = "#24292f"

PLOTLY_CONFIG: dict[str, Any] = {
    "displaylogo": False,
    "toImageButtonOptions": {
        "format": "png",
        "filename": "perplexity_lens",
        "scale": 2,
    },
    "modeBarButtonsToRemove": ["lasso2d", "select2d"],
}


def plotly_config(filename: str = "perplexity_lens", *, scale: int = 2) -> dict[str, Any]:
    """`PLOTLY_CONFIG` with the PNG file name (without extension) and scale set."""
    config = {**PLOTLY_CONFIG}
    config["toImageButtonOptions"] = {"format": "png", "filename": filename, "scale": scale}
    return config


def source_color(source: str) -> str:
    """Colour of a data source, the same in every chart."""
    if source in SOURCE_COLORS:
        return SOURCE_COLORS[source]
    return FALLBACK_COLORS[zlib.crc32(source.encode("utf-8")) % len(FALLBACK_COLORS)]


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def _base_layout(fig: go.Figure, title: str, x_title: str, y_title: str) -> go.Figure:
    fig.update_layout(
        template="plotly_white",
        title={"text": title, "x": 0.0, "xanchor": "left", "font": {"size": 16}},
        font={"family": "system-ui, -apple-system, Segoe UI, Roboto, sans-serif", "size": 13},
        legend={
            "orientation": "h",
            "yanchor": "bottom",
            "y": 1.02,
            "xanchor": "left",
            "x": 0.0,
            "title": {"text": ""},
        },
        margin={"l": 60, "r": 20, "t": 80, "b": 55},
        paper_bgcolor="white",
        plot_bgcolor="white",
        hoverlabel={"font": {"family": "ui-monospace, Menlo, Consolas, monospace"}},
    )
    fig.update_xaxes(title_text=x_title, showline=True, linecolor="#8c959f", ticks="outside")
    fig.update_yaxes(title_text=y_title, showline=True, linecolor="#8c959f", ticks="outside")
    place_legend(fig)
    return fig


def place_legend(fig: go.Figure) -> None:
    """A legend of more than two entries wraps above the plot, onto the title: put it below
    (call again after adding legend entries to a laid-out figure; it is idempotent)."""
    entries = [t for t in fig.data if t.name and t.showlegend is not False]
    if len(entries) > 2:  # at the figure's bottom, in a margin grown by its rows: under the
        # axis title at any plot height (a plot-relative y overlapped it on short plots)
        fig.update_layout(
            legend={"yref": "container", "yanchor": "bottom", "y": 0.0},
            margin={"b": 60 + 22 * ((len(entries) + 1) // 2)},
        )


#: `trace.meta["role"]` of traces that only label something in the legend (no data).
LEGEND_ONLY = frozenset({"tau", "tau_b", "rule_of_thumb", "pooled"})


def data_traces(fig: go.Figure) -> list[Any]:
    """The figure's traces that draw data (not the legend-only labels of τ lines and bands)."""
    return [
        t for t in fig.data if not (isinstance(t.meta, dict) and t.meta.get("role") in LEGEND_ONLY)
    ]


def _tau_legend_entry(fig: go.Figure, tau: float, name: str | None = None) -> None:
    """The τ line's label as a legend entry (a dashed line named "τ = 2.5"), so no label sits
    over the data (`trace.meta["role"]` "tau")."""
    fig.add_trace(
        go.Scatter(
            x=[None],
            y=[None],
            mode="lines",
            line={"color": TAU_COLOR, "width": 1.5, "dash": "dash"},
            name=name or f"τ = {fmt.tau(tau)}",
            hoverinfo="skip",
            meta={"role": "tau"},
        )
    )
    place_legend(fig)


def _add_tau_vline(
    fig: go.Figure, tau: float | None, *, log_x: bool, label_tau: float | None = None
) -> None:
    """Dashed vertical line at x = tau, named "tau", labelled in the legend (never over the
    data) as "τ = `label_tau`" (default: tau itself). Shapes take data values on log axes too,
    so `log_x` changes nothing for the line."""
    if tau is None:
        return
    fig.add_shape(
        type="line",
        name="tau",
        x0=tau,
        x1=tau,
        xref="x",
        y0=0,
        y1=1,
        yref="paper",
        line={"color": TAU_COLOR, "width": 1.5, "dash": "dash"},
    )
    _tau_legend_entry(fig, tau if label_tau is None else label_tau)


def _add_tau_hline(fig: go.Figure, tau: float | None, *, log_y: bool) -> None:
    """Dashed horizontal line at tau, named "tau", labelled in the legend."""
    if tau is None:
        return
    fig.add_shape(
        type="line",
        name="tau",
        x0=0,
        x1=1,
        xref="paper",
        y0=tau,
        y1=tau,
        yref="y",
        line={"color": TAU_COLOR, "width": 1.5, "dash": "dash"},
    )
    _tau_legend_entry(fig, tau)


def _log_tick_values(lo: float, hi: float) -> list[float] | None:
    """Ticks for a log axis from lo to hi: 1-2-5 per decade (powers of ten alone over more than
    three decades), finer steps within a range under a decade; None without a usable range.

    Every tick is given explicitly (with `_tick_text`), so all labels share one font size:
    plotly's own log ticks print the powers of ten larger than the 2s and 5s between them."""
    if not (lo > 0 and hi > 0 and math.isfinite(lo) and math.isfinite(hi)):
        return None
    if hi / lo < 10:
        narrow = (
            (1, 1.2, 1.5, 2, 3, 4, 5, 7)
            if hi / lo >= 2
            else (1, 1.1, 1.2, 1.3, 1.5, 1.7, 2, 2.5, 3, 4, 5, 6, 7, 8, 9)
        )
        first = math.floor(math.log10(lo))
        ticks = [m * 10.0**e for e in (first, first + 1) for m in narrow]
        ticks = [t for t in ticks if lo / 1.0001 <= t <= hi * 1.0001]
        return ticks if len(ticks) >= 2 else None
    ticks = []
    # Over more than three decades 1-2-5 ticks crowd and overlap; keep the powers of ten.
    mantissas = (1, 2, 5) if hi / lo <= 1e3 else (1,)
    first, last = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    step = max(1, math.ceil((last - first) / 8))  # at most about 8 decades labelled
    for exponent in range(first, last + 1, step):
        for mantissa in mantissas:
            value = mantissa * 10.0**exponent
            # Ticks below the data sit in plotly's padding or are dropped, so start a decade low.
            if 10.0 ** math.floor(math.log10(lo)) <= value <= hi * 1.0001:
                ticks.append(value)
    return ticks


def _tick_text(value: float) -> str:
    """ "2", "500", "10k", "1M", "1e9": short labels for log-axis ticks."""
    if value >= 1e7:
        mantissa, exponent = f"{value:.0e}".split("e")
        return f"{mantissa}e{int(exponent)}"
    if value >= 1e6:
        return f"{value / 1e6:g}M"
    if value >= 1e4:
        return f"{value / 1e3:g}k"
    return f"{value:.4g}"


def _set_log_axis(fig: go.Figure, axis: str, values: np.ndarray, *, extra: float | None) -> None:
    """Log axis with readable full-number ticks ("1 2 5 10 20 50 ...") over the data range."""
    finite = values[np.isfinite(values) & (values > 0)]
    if extra is not None:
        finite = np.append(finite, extra)
    update: dict[str, Any] = {"type": "log"}
    if finite.size:
        ticks = _log_tick_values(float(finite.min()), float(finite.max()))
        if ticks:
            update.update(tickvals=ticks, ticktext=[_tick_text(t) for t in ticks])
    if axis == "x":
        fig.update_xaxes(**update)
    else:
        fig.update_yaxes(**update)


def _sources(frame: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(frame["source"].tolist()))


def empty_message(fig: go.Figure, text: str) -> None:
    """Say `text` in the middle of a plot that has nothing to draw, without tick labels or
    lines (a zero line on an empty plot points at nothing)."""
    fig.layout.shapes = ()
    fig.add_annotation(
        text=text,
        xref="paper",
        yref="paper",
        x=0.5,
        y=0.5,
        showarrow=False,
        font={"color": "#6b7280", "size": 13},
    )
    fig.update_xaxes(showticklabels=False, zeroline=False)
    fig.update_yaxes(showticklabels=False, zeroline=False)
