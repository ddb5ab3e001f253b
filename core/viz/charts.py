"""Plotly figure builders for the paper's views (pure functions: data in, `go.Figure` out).

Each data source keeps one colour in every chart (`SOURCE_COLORS`; unknown sources get a
stable colour from `FALLBACK_COLORS` picked by a hash of their name, so it does not change with
the order in which sources appear). Trace names are the sources' display labels
(`source_label`); the raw key is kept in `trace.meta["source"]`.

Pages show the figures with the modebar's PNG download enabled::

    st.plotly_chart(fig, config=PLOTLY_CONFIG)            # or plotly_config("spike_plot")

The modebar camera button then saves a 2x PNG. Everything needed for a good export (title,
axis titles, white background, legend) lives in the figure itself, so the PNG looks the same
as the page.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from core import fmt
from core.data.records import ScoredExample
from core.scoring.tokens import TokenScores

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
SOURCE_LABELS: dict[str, str] = {
    "ground_truth": "Ground truth",
    "self_output": "Self-Output",
    "rephrase": "Rephrase",
    "generated": "Generated",
}
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


def source_label(source: str) -> str:
    """Display label of a data source ("self_output" -> "Self-Output"; others unchanged)."""
    return SOURCE_LABELS.get(source, source)


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
    entries = [t for t in fig.data if t.name and t.showlegend is not False]
    if len(entries) > 2:  # a legend this long wraps above the plot, onto the title: put it below
        fig.update_layout(
            legend={"yanchor": "top", "y": -0.25}, margin={"b": 55 + 22 * ((len(entries) + 1) // 2)}
        )
    return fig


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
        hover = [f"ppl {lo}–{hi}: {v} {unit}" for lo, hi, v in zip(low_text, high_text, shown,
                                                                   strict=True)]  # fmt: skip
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
                customdata=[f"ppl ≤ {fmt.num(p)}: {fmt.share(v)}" for p, v in zip(ppl, share,
                                                                                  strict=True)],
                hovertemplate="%{customdata}<extra>%{fullData.name}</extra>",
            )
        )  # fmt: skip
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


RULE_OF_THUMB_FILL = "rgba(9,105,218,0.08)"


def share_at_tau(curve: pd.DataFrame, tau: float, y: str = "share") -> float:
    """A curve's value at `tau`: its own row when the curve holds `tau`, else read off the curve
    (log-interpolated between the neighbouring rows; a page that shows the number elsewhere
    passes the exact value to `share_vs_tau_chart` as `at_tau` instead)."""
    part = curve.sort_values("tau")
    taus = part["tau"].to_numpy(dtype=np.float64)
    values = part[y].to_numpy(dtype=np.float64)
    exact = np.flatnonzero(np.isclose(taus, tau, rtol=1e-12, atol=0.0))
    if exact.size:
        return float(values[exact[0]])
    return float(np.interp(np.log(tau), np.log(taus), values))


def share_vs_tau_chart(
    curves: pd.DataFrame,
    current_tau: float | None = None,
    *,
    y: str = "share",
    target_band: tuple[float, float] | None = (0.20, 0.25),
    title: str | None = None,
    at_tau: Mapping[str, float] | None = None,
) -> go.Figure:
    """Share of response tokens masked (ppl > tau) against tau, per source, log x axis.

    `curves` has columns source, tau and `y` ("share": pooled, or "mean_example_share"), as
    made by `core.scoring.analytics.share_vs_tau`. The current tau is a dashed vertical line with a
    marker per source, labelled with `core.fmt.share`. The marker's value is `at_tau[source]`
    when given: the exact share the page shows in its cards and tables, computed from the same
    tokens with the same rule (the curve gets that point too, so the line passes through the
    marker); otherwise the curve's own row at τ, or the curve read at τ. `target_band` shades
    the paper's rule of thumb (about 20-25% masked works best), named in the legend; pass None
    to hide it.
    """
    fig = go.Figure()
    if target_band is not None:
        fig.add_hrect(
            y0=target_band[0],
            y1=target_band[1],
            fillcolor=RULE_OF_THUMB_FILL,
            line_width=0,
            layer="below",
            name="rule_of_thumb",
        )
        band_name = (
            f"paper's rule of thumb: {fmt.share(target_band[0], 0)}–"
            f"{fmt.share(target_band[1], 0)} masked"
        )
        fig.add_trace(  # the band's label, in the legend rather than over the curves
            go.Scatter(
                x=[None],
                y=[None],
                mode="markers",
                marker={"symbol": "square", "size": 14, "color": "rgba(9,105,218,0.25)"},
                name=band_name,
                hoverinfo="skip",
                meta={"role": "rule_of_thumb"},
            )
        )
    for source in _sources(curves):
        part = curves[curves["source"] == source].sort_values("tau")
        color = source_color(source)
        taus = part["tau"].to_numpy(dtype=np.float64)
        values = part[y].to_numpy(dtype=np.float64)
        exact = None if at_tau is None or current_tau is None else at_tau.get(source)
        if exact is not None and len(part):
            share = float(exact)
            keep = ~np.isclose(taus, current_tau, rtol=1e-12, atol=0.0)
            taus, values = np.append(taus[keep], current_tau), np.append(values[keep], share)
            order = np.argsort(taus, kind="stable")
            taus, values = taus[order], values[order]
        elif current_tau is not None and len(part):
            share = share_at_tau(part, current_tau, y)
        fig.add_trace(
            go.Scatter(
                x=taus,
                y=values,
                mode="lines",
                line={"color": color, "width": 2},
                name=source_label(source),
                legendgroup=source,
                meta={"source": source},
                customdata=[f"τ = {fmt.tau(t)}: {fmt.share(v)} masked" for t, v in zip(
                    taus, values, strict=True)],
                hovertemplate="%{customdata}<extra>%{fullData.name}</extra>",
            )
        )  # fmt: skip
        if current_tau is not None and len(part):
            text = fmt.share(share)
            fig.add_trace(
                go.Scatter(
                    x=[current_tau],
                    y=[share],
                    mode="markers+text",
                    marker={"color": color, "size": 10, "line": {"color": "white", "width": 1.5}},
                    text=[text],
                    textposition="middle right",
                    textfont={"color": color, "size": 12},
                    name=f"{source_label(source)} at τ",
                    legendgroup=source,
                    showlegend=False,
                    meta={"source": source, "current_tau": True},
                    customdata=[f"τ = {fmt.tau(current_tau)}: {text} masked"],
                    hovertemplate="%{customdata}<extra>%{fullData.name}</extra>",
                )
            )
    _base_layout(
        fig,
        title or "Share of response tokens masked vs τ",
        "τ (mask tokens with ppl > τ; log scale)",
        "masked share of response tokens" if y == "share" else "mean per-example masked share",
    )
    _set_log_axis(fig, "x", curves["tau"].to_numpy(dtype=np.float64), extra=current_tau)
    fig.update_yaxes(tickformat=".0%", range=[0.0, 1.05])
    _add_tau_vline(fig, current_tau, log_x=True)
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


def seq_ppl_box(
    groups: Mapping[str, Sequence[ScoredExample] | TokenScores], *, title: str | None = None
) -> go.Figure:
    """Per-example sequence perplexity per source as box plots (log y), mean marked; a source
    is records or columnar `TokenScores`."""
    fig = go.Figure()
    values = []
    for source, examples in groups.items():
        if isinstance(examples, TokenScores):  # columns: no per-example records
            keep = np.flatnonzero(examples.n_response > 0)
            y = examples.seq_ppl()[keep].tolist()
            text = [examples.ids[i] for i in keep.tolist()]
        else:
            scored = [ex for ex in examples if ex.n_response > 0]
            y, text = [ex.seq_ppl for ex in scored], [ex.id for ex in scored]
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


def masked_share_histogram(
    results: Sequence[tuple[str, Any]], colors: Mapping[str, str]
) -> go.Figure:
    """How the masked share is spread over examples (5%-wide bins), pooled share marked.
    `results`: (side "A" or "B", `core.masking.rules.MaskStats`); `colors`: side -> colour.

    Built from plain dicts without a template object: that keeps it at a few ms per τ change
    (a plotly template alone costs ~20 ms to validate); colours mimic plotly_white.
    """
    edges = np.linspace(0.0, 1.0, 21)
    two = len(results) > 1
    traces, shapes, notes = [], [], []
    for side, stats in results:
        shares = stats.per_example_share[np.isfinite(stats.per_example_share)]
        counts, _ = np.histogram(shares, bins=edges)
        name = f"setting {side}" if two else "examples"
        color = colors[side]
        traces.append(
            go.Bar(
                x=(edges[:-1] + edges[1:]) / 2,
                y=counts,
                width=0.024 if two else 0.048,
                offset=(-0.024 if side == "A" else 0.0) if two else None,
                marker={"color": color, "opacity": 0.85},
                name=name,
                customdata=[
                    f"{fmt.share(a, 0)}–{fmt.share(b, 0)} masked: {fmt.count(c)}"
                    for a, b, c in zip(edges[:-1], edges[1:], counts, strict=True)
                ],
                hovertemplate="%{customdata} examples<extra>" + name + "</extra>",
            )
        )
        x = stats.pooled_share
        shapes.append(
            {
                "type": "line",
                "x0": x,
                "x1": x,
                "y0": 0,
                "y1": 1,
                "yref": "paper",
                "line": {"color": color, "width": 1.5, "dash": "dash"},
            }
        )
        # the pooled share's label goes in the legend, so it never covers a bar
        notes.append(
            go.Scatter(
                x=[None],
                y=[None],
                mode="lines",
                line={"color": color, "width": 1.5, "dash": "dash"},
                name=f"{side + ' ' if two else ''}pooled {fmt.share(x)}",
                hoverinfo="skip",
                meta={"role": "pooled", "side": side, "text": fmt.share(x)},
            )
        )
    axis = {"showline": True, "linecolor": "#8c959f", "gridcolor": "#ebf0f8", "zeroline": False}
    return go.Figure(
        data=traces + notes,
        layout={
            "title": {"text": "Masked share per example", "x": 0.0, "font": {"size": 16}},
            "font": {
                "family": "system-ui, -apple-system, Segoe UI, Roboto, sans-serif",
                "size": 13,
            },
            "paper_bgcolor": "white",
            "plot_bgcolor": "white",
            "margin": {"l": 60, "r": 20, "t": 80, "b": 55},
            "height": 380,
            "bargap": 0.05,
            "barmode": "overlay",
            "showlegend": True,
            "legend": {"orientation": "h", "yanchor": "bottom", "y": 1.02, "x": 0.0},
            "shapes": shapes,
            "xaxis": {
                **axis,
                "title": {"text": "share of the example's response tokens masked"},
                "tickformat": ".0%",
                "range": [-0.02, 1.02],
            },
            "yaxis": {**axis, "title": {"text": "examples"}, "rangemode": "tozero"},
        },
    )


def masking_curve_figure(
    indexes: Mapping[str | None, Any],
    mode: str,
    taus: Sequence[float],
    *,
    band: tuple[float, float] | None = None,
    colors: Mapping[str, str],
) -> go.Figure:
    """Share of response tokens masked vs τ per source (`indexes`: source -> `PplIndex`, with
    None for all sources pooled), the current τ marked, and the compared τ (B) when two are
    given; `band` shades the rule-of-thumb share range."""
    from core.masking.rules import share_vs_tau_curve

    curve_mode = "low" if mode == "low" else "high"
    ppl = indexes[None].sorted_ppl()
    finite = ppl[np.isfinite(ppl)]
    # up to where ~1% of tokens remain above τ (at most 1000): the far tail is flat at ~0%
    hi = float(np.quantile(finite, 0.99)) if finite.size else 100.0
    hi = max([100.0, min(hi, 1000.0), *(t * 1.5 for t in taus)])
    lo = min([1.0, *(t / 1.5 for t in taus)])
    grid = np.geomspace(lo, hi, 240)
    frames, at_tau = [], {}
    for source, index in indexes.items():
        if source is not None:
            frame = share_vs_tau_curve(index, grid, curve_mode)
            frame.insert(0, "source", source)
            frames.append(frame)
            if taus:  # the marker: the card's rule on the same tokens, not a curve reading
                at_tau[source] = float(share_vs_tau_curve(index, [taus[0]], curve_mode)["share"][0])
    title = "Share of response tokens masked vs τ"
    if mode == "percentile":
        title = "STM share masked vs τ (for reference)"
    fig = share_vs_tau_chart(
        pd.concat(frames, ignore_index=True),
        taus[0] if taus else None,
        target_band=band,
        title=title,
        at_tau=at_tau,
    )
    if mode == "low":
        fig.update_xaxes(title_text="τ (mask tokens with ppl < τ; log scale)")
    if len(taus) == 2:
        fig.add_vline(x=taus[1], line={"color": colors["B"], "width": 1.5, "dash": "dot"})
        fig.add_trace(  # B's label in the legend, not over the curve
            go.Scatter(
                x=[None],
                y=[None],
                mode="lines",
                line={"color": colors["B"], "width": 1.5, "dash": "dot"},
                name=f"B: τ = {fmt.tau(taus[1])}",
                hoverinfo="skip",
                meta={"role": "tau_b"},
            )
        )
    fig.update_layout(height=380)
    return fig


def masked_share_marker_text(fig: go.Figure, source: str | None = None) -> list[str]:
    """The text of the current-τ markers of a share-vs-τ figure (of one source, or all): what a
    reader sees beside the curve, for checks against the page's cards."""
    return [
        str(t.text[0])
        for t in fig.data
        if (t.meta or {}).get("current_tau") and source in (None, t.meta.get("source"))
    ]
