"""What each token loss weights, drawn: the Masking studio's "Token losses" section.

- `render_weight_heatmaps`: one panel per loss, side by side where the width allows, the
  example's response tokens coloured by that loss's weight (the token heatmap's look and
  CSS-only hover, `core.viz.heatmap.token_span`). The colour shows what a loss takes away: a
  token at full weight (1) stays white, a token the loss ignores (0) is dark; a token the mask
  leaves out is struck through, as in the masking heatmap. The hover gives the weight, the
  token's base probability and its top-K entropy.
- `weight_scatter`: the response tokens over base probability (log axis) × top-K entropy,
  coloured by one loss's weight on the same scale.

The weights come from `core.masking.weights` (the functions training uses); nothing here
computes a weight.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

from core import fmt
from core.data.records import ScoredExample
from core.masking.weights import BaseTokens, LossWeights
from core.viz.heatmap import heatmap_css, token_repr, token_span
from core.viz.style import _base_layout, _set_log_axis

#: weight -> colour: 0 (out of the loss) dark purple ... 1 (full weight) white (ColorBrewer
#: Purples, reversed; lightness rises monotonically with the weight)
WEIGHT_COLOR_STOPS: tuple[tuple[float, tuple[int, int, int]], ...] = (
    (0.00, (63, 0, 125)),
    (0.20, (106, 81, 163)),
    (0.40, (128, 125, 186)),
    (0.60, (158, 154, 200)),
    (0.80, (218, 218, 235)),
    (1.00, (255, 255, 255)),
)
MISSING_COLOR = "#eef1f4"  # a weight that cannot be computed (EAFT without a top-k)
MASKED_COLOR = "#8c959f"
_RIGHT_ANCHOR_COLUMN = 36  # panels are narrow: tooltips of tokens past this column open leftwards


def weight_color(weight: float) -> str:
    """Background colour ("#rrggbb") of a token with this weight (clipped to [0, 1])."""
    if not math.isfinite(weight):
        return MISSING_COLOR
    t = min(1.0, max(0.0, weight))
    for (t0, c0), (t1, c1) in zip(WEIGHT_COLOR_STOPS, WEIGHT_COLOR_STOPS[1:], strict=False):
        if t <= t1:
            w = 0.0 if t1 == t0 else (t - t0) / (t1 - t0)
            r, g, b = (round(lo + (hi - lo) * w) for lo, hi in zip(c0, c1, strict=True))
            return f"#{r:02x}{g:02x}{b:02x}"
    r, g, b = WEIGHT_COLOR_STOPS[-1][1]
    return f"#{r:02x}{g:02x}{b:02x}"


def weight_colorscale() -> list[list[float | str]]:
    """The same scale as a plotly colorscale over [0, 1]."""
    return [[t, f"rgb({r},{g},{b})"] for t, (r, g, b) in WEIGHT_COLOR_STOPS]


def _entropy_text(entropy: float, k: int) -> str:
    if k < 2 or not math.isfinite(entropy):
        return "H_top-k unknown"
    return f"H_top{k} {fmt.num(entropy)} nats (/ ln {k} = {fmt.num(entropy / math.log(k))})"


def _tip(
    token: str, i: int, w: LossWeights, base: BaseTokens, masked: bool, rank: int | None
) -> str:
    weight = float(w.weights[i])
    lines = [token_repr(token), f"w = {fmt.num(weight)}  ({w.label})"]
    stats = f"p_base {fmt.num(math.exp(base.logprob[i]))}"
    if rank is not None:
        stats += f"  ·  rank {rank}"
    lines.append(stats)
    lines.append(_entropy_text(float(base.entropy[i]), base.k))
    lines.append(f"response token {i}")
    if masked:
        lines.append("masked: out of the loss (counts 0)")
    return "\n".join(lines)


def _legend_html(show_masked: bool) -> str:
    stops = ", ".join(f"{weight_color(k / 20)} {k * 5}%" for k in range(21))
    ticks = "".join(
        f'<span class="pl-tick" style="left:{100 * t:.0f}%">{fmt.num(t)}</span>'
        for t in (0.0, 0.25, 0.5, 0.75, 1.0)
    )
    return (
        '<div class="pl-legend">'
        '<span class="pl-leg-title">per-token weight w (0 = out of the loss, 1 = full)</span>'
        f'<div class="pl-bar-wrap"><div class="pl-bar" style="background:linear-gradient('
        f'to right, {stops})"></div><div class="pl-ticks">{ticks}</div></div>'
        + (
            '<span class="pl-leg-item"><span class="pl-swatch pl-m">abc</span>masked (w = 0)</span>'
            if show_masked
            else ""
        )
        + "</div>"
    )


def render_weight_heatmaps(
    example: ScoredExample,
    weights: Sequence[LossWeights],
    base: BaseTokens,
    *,
    masked: Sequence[bool] | None = None,
    max_tokens: int | None = None,
    subtitle: str = "",
) -> str:
    """One HTML fragment: a panel per loss (`weights`, each one weight per response token of
    `example`), in a grid of side-by-side panels, each headed by the loss, "at step 0" for the
    losses that follow the trained model, and the example's effective-token share (Σw/N, with
    `masked` tokens counting 0). Each token is a `span.pl-t` with `data-i` and `data-w`."""
    n = example.n_response
    if len(base) != n:
        raise ValueError(f"{len(base)} base tokens for {n} response tokens")
    if masked is not None and len(masked) != n:
        raise ValueError(f"masked has {len(masked)} entries for {n} response tokens")
    flags = np.zeros(n, dtype=bool) if masked is None else np.asarray(masked, dtype=bool)
    shown = n if max_tokens is None else max(0, min(n, max_tokens))
    tokens = example.response_tokens
    parts = [heatmap_css(), f"<style>{_CSS}</style>", '<div class="pl-root lw-root">']
    head = [
        f'<span class="pl-src">{html.escape(example.source)}</span>',
        f"<span>{html.escape(example.id)}</span>",
        f"<span>{fmt.count(n)} response tokens</span>",
    ]
    if masked is not None:
        head.append(f"<span>masked: <b>{fmt.count(int(flags.sum()))}</b></span>")
    if subtitle:
        head.append(f"<span>{html.escape(subtitle)}</span>")
    parts.append('<div class="pl-head">' + "".join(head) + "</div>")
    parts.append(_legend_html(masked is not None))
    parts.append('<div class="lw-grid">')
    for w in weights:
        if len(w.weights) != n:
            raise ValueError(f"{w.loss}: {len(w.weights)} weights for {n} response tokens")
        tags = []
        if w.online:
            tags.append('<span class="lw-tag">at step 0 (base)</span>')
        if not w.exact:
            tags.append('<span class="lw-tag lw-warn">approximate</span>')
        share = fmt.share(w.share(flags if masked is not None else None))
        parts.append(
            f'<div class="lw-panel" data-loss="{html.escape(w.loss)}">'
            f'<div class="lw-title"><b>{html.escape(w.label)}</b>{"".join(tags)}'
            f'<span class="lw-share">Σw/N {share}</span></div>'
        )
        notes = [text for text in (w.approx and f"approximate: {w.approx}", w.note) if text]
        if notes:
            parts.append(f'<div class="lw-note">{html.escape("; ".join(notes))}</div>')
        parts.append('<div class="pl-text lw-text">')
        column = 0
        for i in range(shown):
            token = tokens[i]
            value = 0.0 if flags[i] else float(w.weights[i])
            rank = example.rank[i] if i < len(example.rank) else None
            span = token_span(
                token,
                i,
                weight_color(float(w.weights[i])),
                _tip(token, i, w, base, bool(flags[i]), rank),
                right=column > _RIGHT_ANCHOR_COLUMN,
                data={"w": f"{value:.6g}"},
            )
            if flags[i]:
                span = span.replace('class="pl-t', 'class="pl-m pl-t', 1)
            parts.append(span)
            column = len(token) - token.rfind("\n") - 1 if "\n" in token else column + len(token)
        parts.append("</div>")
        if shown < n:
            parts.append(f'<div class="pl-more">… {fmt.count(n - shown)} more tokens</div>')
        parts.append("</div>")
    parts.append("</div></div>")
    return "".join(parts)


def weight_scatter(
    base: BaseTokens,
    weights: LossWeights,
    tokens: Sequence[str],
    *,
    masked: Sequence[bool] | None = None,
    title: str = "",
) -> go.Figure:
    """The response tokens over base probability (log x) × top-K entropy (nats), coloured by
    `weights` on the heatmaps' scale; tokens `masked` leaves out are grey crosses (weight 0).
    A dotted line marks ln K, the entropy's largest value (EAFT's weight 1 at α > 0)."""
    n = len(base)
    if len(weights.weights) != n or len(tokens) != n:
        raise ValueError("base tokens, weights and token texts differ in length")
    flags = np.zeros(n, dtype=bool) if masked is None else np.asarray(masked, dtype=bool)
    prob, entropy, w = base.prob, base.entropy, weights.weights
    text = [
        f"{token_repr(t)}<br>w = {fmt.num(float(wi))}<br>p_base {fmt.num(float(p))}"
        f"<br>{_entropy_text(float(h), base.k)}<br>response token {i}"
        + ("<br>masked: counts 0" if m else "")
        for i, (t, wi, p, h, m) in enumerate(zip(tokens, w, prob, entropy, flags, strict=True))
    ]
    fig = go.Figure()
    kept = np.flatnonzero(~flags)
    fig.add_trace(
        go.Scatter(
            x=prob[kept],
            y=entropy[kept],
            mode="markers",
            name=f"{weights.label} weight",
            text=[text[i] for i in kept],
            hovertemplate="%{text}<extra></extra>",
            marker={
                "size": 8,
                "color": np.nan_to_num(w[kept], nan=1.0),
                "colorscale": weight_colorscale(),
                "cmin": 0.0,
                "cmax": 1.0,
                "line": {"color": "#57606a", "width": 0.6},
                "colorbar": {"title": {"text": "w"}, "thickness": 12, "len": 0.8},
            },
            meta={"role": "tokens"},
        )
    )
    out = np.flatnonzero(flags)
    if out.size:
        fig.add_trace(
            go.Scatter(
                x=prob[out],
                y=entropy[out],
                mode="markers",
                name="masked (w = 0)",
                text=[text[i] for i in out],
                hovertemplate="%{text}<extra></extra>",
                marker={
                    "size": 7,
                    "symbol": "x-thin",
                    "line": {"color": MASKED_COLOR, "width": 1.5},
                },
                meta={"role": "masked"},
            )
        )
    k = base.k
    y_title = f"top-{k} entropy of the base (nats)" if k >= 2 else "top-k entropy (unknown)"
    _base_layout(fig, title or f"{weights.label}: weight per token", "p_base(y) (log)", y_title)
    _set_log_axis(fig, "x", prob, extra=1.0)
    if k >= 2:
        fig.add_shape(
            type="line",
            x0=0,
            x1=1,
            xref="paper",
            y0=math.log(k),
            y1=math.log(k),
            yref="y",
            line={"color": "#8c959f", "width": 1, "dash": "dot"},
        )
        fig.add_annotation(
            x=0,
            xref="paper",
            xanchor="left",
            y=math.log(k),
            yref="y",
            yanchor="bottom",
            text=f"ln {k}: the largest top-{k} entropy",
            showarrow=False,
            font={"size": 11, "color": "#57606a"},
        )
        fig.update_yaxes(range=[-0.05 * math.log(k), 1.12 * math.log(k)])
    fig.update_layout(height=380, showlegend=bool(out.size), margin={"t": 60})
    return fig


_CSS = " ".join(
    line.strip()
    for line in """
.lw-root .pl-legend { margin: 8px 0 10px 0; }
.lw-grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr));
  gap: 10px 12px; }
.lw-panel { border: 1px solid #d0d7de; border-radius: 6px; padding: 6px 9px 8px 9px;
  min-width: 0; }
.lw-title { display: flex; flex-wrap: wrap; align-items: baseline; gap: 4px 8px;
  font-size: 13px; margin-bottom: 4px; }
.lw-tag { font-size: 11px; color: #57606a; background: #eef1f4; border-radius: 4px;
  padding: 0 5px; }
.lw-warn { color: #9a6700; background: #fff8c5; }
.lw-share { margin-left: auto; font-size: 12px; color: #57606a;
  font-variant-numeric: tabular-nums; }
.lw-note { font-size: 11.5px; color: #6e7781; margin-bottom: 4px; }
.lw-text { font-size: 12px; line-height: 1.65; }
""".splitlines()
    if line.strip()
)
