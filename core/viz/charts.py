"""Plotly figure builders for token perplexity (pure functions: data in, `go.Figure` out): the
per-token spike plot, the distribution (histogram, CDF), sequence perplexity per source and the
token categories. The masked-share charts are in `core.viz.masking_charts`, the look they all
share (colours, labels, layout, τ lines, log axes) in `core.viz.style`; this module re-exports
the names pages import from it.

Pages show the figures with the modebar's PNG download enabled::

    st.plotly_chart(fig, config=PLOTLY_CONFIG)            # or plotly_config("spike_plot")

The modebar camera button then saves a 2x PNG. Everything needed for a good export (title,
axis titles, white background, legend) lives in the figure itself, so the PNG looks the same
as the page.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from core import fmt
from core.data.records import ScoredExample
from core.scoring.analytics import SOURCE_LABELS, source_label
from core.scoring.tokens import TokenScores
from core.viz.masking_charts import (
    RULE_OF_THUMB_FILL,
    masked_share_histogram,
    masked_share_marker_text,
    masking_curve_figure,
    share_at_tau,
    share_vs_tau_chart,
)
from core.viz.style import (
    FALLBACK_COLORS,
    LEGEND_ONLY,
    PLOTLY_CONFIG,
    SOURCE_COLORS,
    TAU_COLOR,
    _add_tau_hline,
    _add_tau_vline,
    _base_layout,
    _rgba,
    _set_log_axis,
    _sources,
    _tick_text,
    data_traces,
    plotly_config,
    source_color,
)

#: What pages, tests and benches import from here: this module's builders, and the masked-share
#: charts and shared look that moved to `core.viz.masking_charts` and `core.viz.style`.
__all__ = [
    "FALLBACK_COLORS",
    "LEGEND_ONLY",
    "PLOTLY_CONFIG",
    "RULE_OF_THUMB_FILL",
    "SOURCE_COLORS",
    "SOURCE_LABELS",
    "SURPRISAL_TICKS",
    "TAU_COLOR",
    "category_share_chart",
    "data_traces",
    "masked_share_histogram",
    "masked_share_marker_text",
    "masking_curve_figure",
    "plotly_config",
    "ppl_cdf",
    "ppl_histogram",
    "seq_ppl_box",
    "share_at_tau",
    "share_vs_tau_chart",
    "source_color",
    "source_label",
    "spike_plot",
]


def spike_plot(
    examples: Mapping[str, ScoredExample], *, tau: float | None = None, title: str | None = None
) -> go.Figure:
    """Per-token perplexity along the response position (log y), one trace per source.

    `examples` maps a source to one scored example (typically the same prompt answered by the
    ground truth, a rephrase and the model's own output). Hover shows each token.
    """
    fig = go.Figure()
    for source, example in examples.items():
        ppl = example.ppl_array()
        tokens = [repr(t) for t in example.response_tokens]
        fig.add_trace(
            go.Scatter(
                x=np.arange(ppl.size),
                y=ppl,
                mode="lines+markers",
                name=source_label(source),
                meta={"source": source},
                line={"color": source_color(source), "width": 1.5},
                marker={"size": 4},
                customdata=tokens,
                hovertemplate="pos %{x}<br>%{customdata}<br>ppl %{y:.3g}<extra>%{fullData.name}"
                "</extra>",
            )
        )
    _base_layout(
        fig,
        title or "Per-token perplexity along the response",
        "response token position",
        "token perplexity (log scale)",
    )
    all_ppl = np.concatenate([ex.ppl_array() for ex in examples.values()] or [np.zeros(0)])
    _set_log_axis(fig, "y", all_ppl, extra=tau)
    _add_tau_hline(fig, tau, log_y=True)
    return fig


#: Perplexities labelled on the histogram's surprisal axis (positions are ln ppl, log scale).
SURPRISAL_TICKS = (1.0001, 1.001, 1.01, 1.1, 2.0, 10.0, 100.0, 1e4, 1e8)
#: Lowest surprisal (nats) the histogram resolves: tokens below it (ppl < 1.00001) share its
#: first bin.
MIN_SURPRISAL = 1e-5


def _surprisal_edges(nll: np.ndarray, bins: int) -> np.ndarray:
    """Log-spaced bin edges over token surprisal ln ppl (nats), from the data's 0.5% quantile
    (at least `MIN_SURPRISAL`) to its maximum (at least ln 10)."""
    positive = nll[nll > 0]
    lo = max(float(np.quantile(positive, 0.005)) if positive.size else 1e-3, MIN_SURPRISAL)
    hi = max(float(nll.max()) if nll.size else math.log(10.0), math.log(10.0), lo * 10.0)
    return np.geomspace(lo, hi, bins + 1)


def ppl_histogram(
    frame: pd.DataFrame,
    log_x: bool = True,
    tau: float | None = None,
    *,
    bins: int = 60,
    normalize: bool = True,
    title: str | None = None,
) -> go.Figure:
    """Distribution of token perplexity per source, as overlaid step histograms.

    `frame` is long-form with columns `source` and `ppl` (`core.scoring.analytics.token_ppl_frame`).
    Bins are shared by all sources. With `log_x` they are log-spaced over the surprisal
    ln ppl (x is ln ppl on a log axis, labelled in perplexity): most response tokens have a
    perplexity within a few percent of 1, which log-spaced bins over ppl itself put in one first
    bin, while here ppl 1.001, 1.01 and 1.1 are as far apart as 10 and 10^4 (tokens below the
    first edge are counted in the first bin, those above the last in the last). Without
    `log_x`, linear bins over ppl. With `normalize`, y is the share of the source's tokens in
    each bin (sources of different size stay comparable); otherwise the count. Each trace's x
    holds the bin edges and y the value per bin, repeated for the last edge so the step closes
    (`trace.meta["counts"]` holds the raw counts, `meta["edges_ppl"]` the edges as perplexity).
    """
    values = frame["ppl"].to_numpy(dtype=np.float64)
    values = values[np.isfinite(values)]
    if log_x:
        edges = _surprisal_edges(np.log(np.maximum(values, 1.0)), bins)
        edges_ppl = np.exp(edges)
    else:
        hi = float(values.max()) if values.size else 10.0
        edges = np.linspace(min(1.0, float(values.min()) if values.size else 1.0), hi, bins + 1)
        edges_ppl = edges
    low_text = [fmt.num(v, 4) for v in edges_ppl[:-1]]
    high_text = [fmt.num(v, 4) for v in edges_ppl[1:]]
    fig = go.Figure()
    for source in _sources(frame):
        ppl = frame.loc[frame["source"] == source, "ppl"].to_numpy(dtype=np.float64)
        x = np.log(np.maximum(ppl, 1.0)) if log_x else ppl
        counts, _ = np.histogram(np.clip(x, edges[0], edges[-1]), bins=edges)
        y = counts / counts.sum() if normalize and counts.sum() else counts.astype(np.float64)
        color = source_color(source)
        shown = [fmt.share(v) for v in y] if normalize else [fmt.count(c) for c in counts]
        unit = "of tokens" if normalize else "tokens"
        hover = [
            f"ppl {lo}–{hi}: {v} {unit}"
            for lo, hi, v in zip(low_text, high_text, shown, strict=True)
        ]
        if log_x and hover:
            hover[0] = f"ppl ≤ {high_text[0]}: {shown[0]} {unit}"
            hover[-1] = f"ppl ≥ {low_text[-1]}: {shown[-1]} {unit}"
        fig.add_trace(
            go.Scatter(
                x=edges,
                y=np.append(y, y[-1]),
                mode="lines",
                line={"shape": "hv", "color": color, "width": 1.8},
                fill="tozeroy",
                fillcolor=_rgba(color, 0.15),
                name=source_label(source),
                meta={
                    "source": source,
                    "counts": counts.tolist(),
                    "n_tokens": int(ppl.size),
                    "edges_ppl": edges_ppl.tolist(),
                },
                customdata=[*hover, hover[-1]],
                hovertemplate="%{customdata}<extra>%{fullData.name}</extra>",
            )
        )
    _base_layout(
        fig,
        title or "Token perplexity distribution",
        "token perplexity (log scale of ln ppl: spreads out the tokens near 1)"
        if log_x
        else "token perplexity",
        "share of response tokens" if normalize else "number of response tokens",
    )
    if log_x:
        ticks = [t for t in SURPRISAL_TICKS if edges_ppl[0] <= t <= edges_ppl[-1] * 1.0001]
        fig.update_xaxes(
            type="log",
            tickvals=[math.log(t) for t in ticks],
            ticktext=[_tick_text(t) if t >= 2 else f"{t:g}" for t in ticks],
        )
    if normalize:
        fig.update_yaxes(tickformat=".0%", rangemode="tozero")
    else:
        fig.update_yaxes(rangemode="tozero")
    if tau is not None:  # on the surprisal axis the line sits at ln τ, named by τ
        _add_tau_vline(fig, math.log(tau) if log_x else tau, log_x=log_x, label_tau=tau)
    return fig


def ppl_cdf(
    frame: pd.DataFrame,
    tau: float | None = None,
    *,
    max_points: int = 4000,
    title: str | None = None,
) -> go.Figure:
    """Empirical CDF of token perplexity per source on a log x axis.

    y at x is the share of the source's response tokens with ppl <= x, so 1 - y at tau is the
    share STM masks. Sources with more than `max_points` tokens are drawn at `max_points`
    evenly spaced ranks (last point kept), which is visually identical.
    """
    fig = go.Figure()
    for source in _sources(frame):
        ppl = np.sort(frame.loc[frame["source"] == source, "ppl"].to_numpy(dtype=np.float64))
        n = ppl.size
        share = np.arange(1, n + 1) / n if n else np.zeros(0)
        if n > max_points:
            keep = np.unique(np.linspace(0, n - 1, max_points).round().astype(np.int64))
            ppl, share = ppl[keep], share[keep]
        fig.add_trace(
            go.Scatter(
                x=ppl,
                y=share,
                mode="lines",
                line={"shape": "hv", "color": source_color(source), "width": 2},
                name=source_label(source),
                meta={"source": source, "n_tokens": int(n)},
                customdata=[
                    f"ppl ≤ {fmt.num(p)}: {fmt.share(v)}" for p, v in zip(ppl, share, strict=True)
                ],
                hovertemplate="%{customdata}<extra>%{fullData.name}</extra>",
            )
        )
    _base_layout(
        fig,
        title or "Cumulative distribution of token perplexity",
        "token perplexity (log scale)",
        "share of response tokens with ppl ≤ x",
    )
    _set_log_axis(fig, "x", frame["ppl"].to_numpy(dtype=np.float64), extra=tau)
    fig.update_yaxes(tickformat=".0%", range=[0, 1.02])
    _add_tau_vline(fig, tau, log_x=True)
    return fig


def category_share_chart(df: pd.DataFrame, *, title: str | None = None) -> go.Figure:
    """Grouped bars: each token category's share among all vs high-perplexity tokens.

    `df` comes from `core.scoring.analytics.category_shares` (columns source, category, share_all,
    share_high, tau). Per source, a pale bar for all response tokens and a solid one for
    tokens with ppl > tau.
    """
    fig = go.Figure()
    tau = float(df["tau"].iloc[0]) if "tau" in df.columns and len(df) else None
    high_label = f"ppl > {fmt.tau(tau)}" if tau is not None else "high ppl"
    categories = list(dict.fromkeys(df["category"].tolist()))
    for source in _sources(df):
        part = df[df["source"] == source].set_index("category").reindex(categories)
        color = source_color(source)
        label = source_label(source)
        fig.add_trace(
            go.Bar(
                x=categories,
                y=part["share_all"].to_numpy(dtype=np.float64),
                name=f"{label} · all tokens",
                marker={"color": _rgba(color, 0.3), "line": {"color": color, "width": 1.5}},
                meta={"source": source, "subset": "all"},
                customdata=[fmt.share(v) for v in part["share_all"]],
                hovertemplate="%{x}: %{customdata} of all tokens<extra>" + label + "</extra>",
            )
        )
        fig.add_trace(
            go.Bar(
                x=categories,
                y=part["share_high"].to_numpy(dtype=np.float64),
                name=f"{label} · {high_label}",
                marker={"color": color, "line": {"color": color, "width": 1.5}},
                meta={"source": source, "subset": "high"},
                customdata=[fmt.share(v) for v in part["share_high"]],
                hovertemplate="%{x}: %{customdata} of high-ppl tokens<extra>" + label + "</extra>",
            )
        )
    _base_layout(
        fig,
        title or f"Token categories: all vs high-perplexity ({high_label}) tokens",
        "token category",
        "share of tokens",
    )
    fig.update_layout(
        barmode="group",
        bargap=0.25,
        bargroupgap=0.05,
        legend={"orientation": "v", "x": 1.02, "xanchor": "left", "y": 1.0, "yanchor": "top"},
        margin={"r": 200, "t": 60},
    )
    fig.update_yaxes(tickformat=".0%", rangemode="tozero")
    return fig


def seq_ppl_box(groups: Mapping[str, TokenScores], *, title: str | None = None) -> go.Figure:
    """Per-example sequence perplexity per source as box plots (log y), mean marked."""
    fig = go.Figure()
    values = []
    for source, examples in groups.items():
        keep = np.flatnonzero(examples.n_response > 0)
        y = examples.seq_ppl()[keep].tolist()
        text = [examples.ids[i] for i in keep.tolist()]
        values += y
        fig.add_trace(
            go.Box(
                y=y,
                text=text,
                name=source_label(source),
                meta={"source": source},
                marker={"color": source_color(source), "size": 4},
                boxmean=True,
                boxpoints="outliers",
                customdata=[fmt.num(v) for v in y],
                hovertemplate="%{text}<br>seq ppl %{customdata}<extra>%{fullData.name}</extra>",
            )
        )
    _base_layout(
        fig,
        title or "Sequence perplexity per data source",
        "data source",
        "sequence perplexity (log scale)",
    )
    # explicit ticks: plotly's own log ticks print "10" larger than the 2s and 5s
    _set_log_axis(fig, "y", np.asarray(values, dtype=np.float64), extra=None)
    fig.update_layout(showlegend=False)
    return fig
