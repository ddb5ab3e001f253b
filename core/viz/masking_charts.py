"""Plotly figure builders for the masked share (pure functions: data in, `go.Figure` out):
the share of response tokens masked against τ per source (with the current τ's marker), how the
masked share spreads over examples, and the Masking studio's curve. Shared look: `core.viz.style`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from core import fmt
from core.masking.rules import share_vs_tau_curve
from core.scoring.analytics import source_label
from core.viz.style import (
    _add_tau_vline,
    _base_layout,
    _set_log_axis,
    _sources,
    place_legend,
    source_color,
)

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
                customdata=[
                    f"τ = {fmt.tau(t)}: {fmt.share(v)} masked"
                    for t, v in zip(taus, values, strict=True)
                ],
                hovertemplate="%{customdata}<extra>%{fullData.name}</extra>",
            )
        )
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
    most = max((int(max(t.y, default=0)) for t in traces), default=0)
    # examples are counted: whole-number ticks (plotly would put 0.2 steps under a count of 1)
    counts_axis = {"dtick": 1, "tick0": 0} if most <= 10 else {"tickformat": "d"}
    fig = go.Figure(
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
            "yaxis": {
                **axis,
                **counts_axis,
                "title": {"text": "examples"},
                "rangemode": "tozero",
            },
        },
    )
    place_legend(fig)  # two settings: four entries, below the plot
    return fig


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
