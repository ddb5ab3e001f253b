"""The "Where it forgot" view's pure builders: one probe item's answer tokens coloured by their
drift from the base model (HTML), and the charts of drift across a probe and across runs.

The token view reuses the perplexity heatmap's look and hover mechanism
(`core.viz.heatmap.token_span`: a CSS-only tooltip from `data-tip`). Colour is either the token
KL(base ‖ tuned) on a log scale (white = no drift, the heatmap's white → yellow → red stops) or
the change of the token's log-probability on a diverging scale (red: the tuned model lost
confidence in the base's token, blue: it gained some). The hover names the token, its KL, the
change and, once computed (`TokenHover`), its probability under both models and both models'
top-5 next tokens side by side.

Charts follow the app's style (`core.viz.style._base_layout`): readable axis titles, the y axis
from 0 (KL and shares are never negative), 95% intervals as error bars, and what a chart cannot
show attached as notes (`core.viz.run_style.figure_notes` reads them).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from core.eval.labels import finite
from core.fmt import value_text
from core.viz.heatmap import (
    delta_color,
    heatmap_css,
    ppl_color,
    prompt_span,
    token_repr,
    token_span,
)
from core.viz.run_style import method_color
from core.viz.style import _base_layout, empty_message

KL, DLP = "kl", "dlp"
#: The colour modes of the token view.
COLOR_MODES = {KL: "token KL from the base", DLP: "Δ log-prob of the token"}
#: The KL colour scale spans three decades below its top (a log scale: white below).
KL_DECADES = 3
#: The smallest top of the KL colour scale (nats).
KL_MIN_TOP = 0.1
#: Δ log-prob at which the diverging scale saturates (nats).
DLP_LIMIT = 2.0
#: Characters of a token in the top-5 columns of a hover.
_ALT_CHARS = 14
#: Tokens past this column of their line open their hover leftwards (the view is half a page).
RIGHT_COLUMN = 36
CHART_HEIGHT = 330
KL_TITLE = "mean token KL, nats"
ORANGE, GREY = "#d95f02", "#9ca3af"


@dataclass(frozen=True)
class TokenHover:
    """What a token's hover adds once both models ran on the item: the base's answer token's
    probability under each, and each model's top next tokens as (text, probability)."""

    base_p: float
    tuned_p: float
    base_top: list[tuple[str, float]]
    tuned_top: list[tuple[str, float]]


# ------------------------------------------------------------------------------- colours


def nice_ceiling(value: float) -> float:
    """The smallest 1, 2, 5 × 10^k at or above `value` (positive)."""
    exp = math.floor(math.log10(value))
    for mult in (1.0, 2.0, 5.0, 10.0):
        top = mult * 10.0**exp
        if top >= value * (1 - 1e-12):
            return float(f"{top:.12g}")
    return 10.0 ** (exp + 1)


def kl_scale_top(values: Sequence[float]) -> float:
    """The top of the KL colour scale for a probe: a 1-2-5 number at or above its largest token
    KL, at least `KL_MIN_TOP` (so the items of one probe and round share one scale)."""
    finite = [float(v) for v in values if math.isfinite(float(v))]
    top = max(finite, default=0.0)
    return nice_ceiling(top) if top > KL_MIN_TOP else KL_MIN_TOP


def kl_color(kl: float, top: float) -> str:
    """Background of a token with KL `kl` on the log scale [top / 10^KL_DECADES, top] (white at
    and below its bottom)."""
    if not math.isfinite(kl):
        kl = top
    bottom = top / 10**KL_DECADES
    # the perplexity map's stops on a log scale: ppl 1 is white, ppl 10^d its darkest
    return ppl_color(max(kl, bottom) / bottom, 1.0, 10**KL_DECADES)


def dlp_color(dlp: float, limit: float = DLP_LIMIT) -> str:
    """Background of a token whose log-probability changed by `dlp` (tuned − base): red where
    the tuned model lost confidence in the base's token, blue where it gained some."""
    return delta_color(-dlp, limit)


# ------------------------------------------------------------------------------- tokens


def _short(token: str) -> str:
    text = repr(token)
    return text if len(text) <= _ALT_CHARS else text[: _ALT_CHARS - 2] + "…" + text[-1]


def _prob(p: float) -> str:
    return f"{p:.3f}" if p >= 0.001 or p == 0 else f"{p:.0e}"


def _top_columns(hover: TokenHover, token: str) -> list[str]:
    """The two top-k columns side by side, the base's answer token marked ◀."""
    k = max(len(hover.base_top), len(hover.tuned_top))
    width = 3 + _ALT_CHARS + 2 + 5 + 2

    def cell(rows: list[tuple[str, float]], j: int) -> str:
        if j >= len(rows):
            return " " * width
        text, p = rows[j]
        mark = " ◀" if text == token else "  "
        return f"{j + 1}. {_short(text):<{_ALT_CHARS}}  {_prob(p):>5}{mark}"

    head = f"{'base top-' + str(len(hover.base_top)):<{width}}   tuned top-{len(hover.tuned_top)}"
    return [
        head,
        *(f"{cell(hover.base_top, j):<{width}}   {cell(hover.tuned_top, j)}" for j in range(k)),
    ]


def drift_tip(
    token: str,
    i: int,
    n: int,
    kl: float,
    dlp: float,
    hover: TokenHover | None = None,
    pending: str = "",
    category: str = "",
) -> str:
    """The hover text of answer token `i` of `n`: the token, its KL and Δ log-prob, and with
    `hover` its probability under both models and both top-5 lists (else `pending`)."""
    head = f"{token_repr(token)}   answer token {i + 1} of {n}"
    lines = [head + (f" · {category}" if category else ""), f"KL(base ‖ tuned)  {kl:.4f} nats"]
    ratio = math.exp(dlp) if dlp < 700 else math.inf
    lines.append(f"Δ log p (tuned − base)  {dlp:+.3f}   (p × {ratio:.3g})")
    if hover is not None:
        lines.append(f"p of this token: base {_prob(hover.base_p)} → tuned {_prob(hover.tuned_p)}")
        lines += _top_columns(hover, token)
    elif pending:
        lines.append(pending)
    return "\n".join(lines)


def _legend(mode: str, top: float, limit: float) -> str:
    if mode == DLP:
        stops = ", ".join(dlp_color(v * limit, limit) for v in (-1, -0.5, 0, 0.5, 1))
        ticks = (
            f'<span class="pl-tick" style="left:0%;transform:none;white-space:nowrap">−{limit:g} '
            'lost</span><span class="pl-tick" style="left:50%">0</span><span class="pl-tick" '
            f'style="left:100%;transform:translateX(-100%);white-space:nowrap">+{limit:g} gained'
            "</span>"
        )
        title = "Δ log-prob of the base's token (tuned − base), nats"
    else:
        bottom = top / 10**KL_DECADES
        stops = ", ".join(kl_color(bottom * 10 ** (KL_DECADES * k / 20), top) for k in range(21))
        marks = [bottom * 10**d for d in range(KL_DECADES + 1)]
        ticks = "".join(
            f'<span class="pl-tick" style="left:{100 * d / KL_DECADES:.2f}%">{m:g}</span>'
            for d, m in enumerate(marks)
        )
        title = f"token KL(base ‖ tuned), nats, log scale (≤ {bottom:g}: white)"
    return (
        f'<div class="pl-legend"><span class="pl-leg-title">{html.escape(title)}</span>'
        f'<div class="pl-bar-wrap"><div class="pl-bar" style="background:linear-gradient('
        f'to right, {stops})"></div><div class="pl-ticks">{ticks}</div></div></div>'
    )


def render_drift_tokens(
    tokens: Sequence[str],
    kl: Sequence[float],
    dlp: Sequence[float],
    *,
    mode: str = KL,
    top: float | None = None,
    limit: float = DLP_LIMIT,
    hovers: Sequence[TokenHover] | None = None,
    pending: str = "",
    categories: Sequence[str] | None = None,
    facts: Sequence[tuple[str, str]] = (),
    prompt: str | None = None,
    prompt_label: str = "prompt",
    right_column: int | None = RIGHT_COLUMN,
) -> str:
    """HTML of one probe item's answer tokens coloured by drift (`mode` "kl": token KL on a log
    scale up to `top`; "dlp": Δ log-prob, diverging, saturating at ±`limit`), with a legend, a
    header of `facts` (label, value) and, when given, the `prompt` in a collapsed block. Each
    token is a `span.pl-t` with `data-i`, `data-kl` and `data-dlp`; its hover gives the token, KL
    and Δ log-prob, and with `hovers` both models' probability of it and their top-5 (else
    `pending`, e.g. "top-5: computing…"). Tokens past `right_column` on their line open their
    hover leftwards (None: never, for a view at the left of the page). Hovers open upwards: the
    view sits near the top of a page, its tokens below its header and legend, so a hover above a
    token stays on the screen where one below would run past its bottom."""
    n = len(tokens)
    if len(kl) != n or len(dlp) != n:
        raise ValueError(f"{n} tokens but {len(kl)} KL and {len(dlp)} Δ log-prob values")
    if hovers is not None and len(hovers) != n:
        raise ValueError(f"{n} tokens but {len(hovers)} hovers")
    if mode not in COLOR_MODES:
        raise ValueError(f"unknown colour mode {mode!r} (use {', '.join(COLOR_MODES)})")
    top = top if top is not None else kl_scale_top(kl)
    parts = [heatmap_css(), f"<style>{_CSS}</style>", '<div class="pl-root pd-root">']
    if facts:
        parts.append(
            '<div class="pl-head">'
            + "".join(
                f"<span>{html.escape(label)} <b>{html.escape(value)}</b></span>"
                if label
                else f'<span class="pl-src">{html.escape(value)}</span>'
                for label, value in facts
            )
            + "</div>"
        )
    parts.append(_legend(mode, top, limit))
    if prompt is not None:
        parts.append(
            f'<details class="pl-prompt"><summary>{html.escape(prompt_label)} · '
            f'{len(prompt)} characters (not scored)</summary><div class="pl-text">'
            + "".join(prompt_span(line) for line in prompt.splitlines(keepends=True))
            + "</div></details>"
        )
    parts.append('<div class="pl-resp"><div class="pl-text">')
    column = 0
    for i, token in enumerate(tokens):
        k, d = float(kl[i]), float(dlp[i])
        background = kl_color(k, top) if mode == KL else dlp_color(d, limit)
        tip = drift_tip(
            token,
            i,
            n,
            k,
            d,
            hovers[i] if hovers is not None else None,
            pending,
            categories[i] if categories is not None else "",
        )
        right = right_column is not None and column > right_column
        parts.append(
            token_span(
                token, i, background, tip, right=right, data={"kl": f"{k:.6g}", "dlp": f"{d:.6g}"}
            )
        )
        column = len(token) - token.rfind("\n") - 1 if "\n" in token else column + len(token)
    parts.append("</div></div></div>")
    return "".join(parts)


_CSS = " ".join(
    line.strip()
    for line in """
.pd-root .pl-legend { margin: 6px 0 6px 0; }
.pd-root .pl-prompt { margin: 0 0 8px 0; }
.pd-root .pl-prompt .pl-text { max-height: 9em; overflow-y: auto; }
.pd-root .pl-t::after { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
.pd-root .pl-t::after { top: auto; bottom: calc(100% + 4px); }
""".splitlines()
    if line.strip()
)


# ------------------------------------------------------------------------------- charts


def _notes(fig: go.Figure, notes: Sequence[str]) -> go.Figure:
    fig.update_layout(meta={"notes": list(notes)})
    return fig


def _error_y(values: Sequence[Any], lows: Sequence[Any], highs: Sequence[Any]) -> dict[str, Any]:
    return {
        "type": "data",
        "symmetric": False,
        "thickness": 1.5,
        "width": 5,
        "color": "#1f2328",
        "array": [
            h - v if finite(h) and finite(v) else 0 for v, h in zip(values, highs, strict=True)
        ],
        "arrayminus": [
            v - lo if finite(lo) and finite(v) else 0 for v, lo in zip(values, lows, strict=True)
        ],
    }


def _from_zero(fig: go.Figure, values: Sequence[Any], axis: str = "y") -> None:
    known = [float(v) for v in values if finite(v)]
    top = max(known, default=0.0)
    update = fig.update_yaxes if axis == "y" else fig.update_xaxes
    update(range=[0.0, 1.15 * top if top > 0 else 1.0], rangemode="tozero")


def _layout(fig: go.Figure, title: str, x_title: str, y_title: str) -> go.Figure:
    _base_layout(fig, title, x_title, y_title)
    fig.update_layout(
        height=CHART_HEIGHT,
        margin={"l": 64, "r": 16, "t": 56, "b": 60},
        title={"font": {"size": 15}},
        showlegend=False,
    )
    fig.update_xaxes(title_font={"size": 12})
    fig.update_yaxes(title_font={"size": 12})
    return fig


def _bars(
    fig: go.Figure,
    labels: Sequence[str],
    frame: pd.DataFrame,
    prefix: str,
    hover: Sequence[str],
    color: str,
    name: str = "",
) -> None:
    values = [v if finite(v) else None for v in frame[prefix]]
    fig.add_trace(
        go.Bar(
            x=list(labels),
            y=values,
            name=name or prefix,
            marker={"color": color},
            error_y=_error_y(
                frame[prefix].tolist(),
                frame[f"{prefix}_low"].tolist(),
                frame[f"{prefix}_high"].tolist(),
            ),
            customdata=list(hover),
            hovertemplate="%{customdata}<extra></extra>",
        )
    )


def _interval(
    value: Any, low: Any, high: Any, digits: int = 3, scale: float = 1.0, unit: str = ""
) -> str:
    """A level with its interval by the one rule (core.fmt.value_text): KL in nats, or a share
    of 0-1 in percent (`scale` 100)."""
    if scale == 100.0 or unit == "%":  # a share: 0-1, or already in percent (scale 1)
        div = 1.0 if scale == 100.0 else 100.0
        parts = [v / div if finite(v) else None for v in (value, low, high)]
        return value_text(*parts, percent=True).replace(" (no interval)", "")
    return value_text(value, low, high, digits=digits).replace(" (no interval)", "")


def category_chart(frame: pd.DataFrame) -> go.Figure:
    """Mean token KL per token category (`study.drift.by_category`) with 95% intervals
    over items; each category's label gives its share of the probe's KL mass."""
    fig = go.Figure()
    notes = []
    if frame.empty or not frame["tokens"].sum():
        empty_message(fig, "No tokens in this probe.")
    else:
        shown = frame[frame["tokens"] > 0]
        hover = [
            f"{r.category}: {r.tokens} tokens ({100 * r.token_share:.1f}% of the probe)<br>"
            f"mean KL {_interval(r.kl, r.kl_low, r.kl_high)} nats<br>"
            f"share of KL mass {_interval(r.kl_share, r.kl_share_low, r.kl_share_high, 1, 100, '%')}"
            for r in shown.itertuples()
        ]
        labels = [
            f"{r.category}<br>{100 * r.kl_share:.0f}% of KL" if finite(r.kl_share) else r.category
            for r in shown.itertuples()
        ]
        _bars(fig, labels, shown, "kl", hover, ORANGE)
        _from_zero(fig, [*shown["kl"], *shown["kl_high"]])
        missing = frame[frame["tokens"] == 0]["category"].tolist()
        if missing:
            notes.append(f"No {', '.join(missing)} tokens in this probe's answers.")
    return _notes(_layout(fig, "By token category", "token category", KL_TITLE), notes)


def category_share_chart(frame: pd.DataFrame) -> go.Figure:
    """Each token category's share of the probe's tokens beside its share of the probe's KL
    mass (with its 95% interval over items): a category whose KL share exceeds its token share
    drifted more than its size."""
    fig = go.Figure()
    if frame.empty or not frame["tokens"].sum():
        empty_message(fig, "No tokens in this probe.")
        return _notes(_layout(fig, "Share of the KL mass", "token category", "% of the probe"), [])
    cats = frame["category"].tolist()
    fig.add_trace(
        go.Bar(
            x=cats,
            y=[100 * s for s in frame["token_share"]],
            name="share of tokens",
            marker={"color": GREY},
            customdata=[
                f"{c}: {100 * s:.1f}% of the tokens"
                for c, s in zip(cats, frame["token_share"], strict=True)
            ],
            hovertemplate="%{customdata}<extra></extra>",
        )
    )
    scaled = frame.assign(
        **{c: frame[c] * 100 for c in ("kl_share", "kl_share_low", "kl_share_high")}
    )
    hover = [
        f"{r.category}: {_interval(r.kl_share, r.kl_share_low, r.kl_share_high, 1, unit='%')} "
        "of the KL mass"
        for r in scaled.itertuples()
    ]
    _bars(fig, cats, scaled, "kl_share", hover, ORANGE, "share of KL mass")
    _layout(fig, "Share of the KL mass", "token category", "% of the probe")
    fig.update_layout(
        barmode="group",
        showlegend=True,
        legend={
            "orientation": "h",
            "y": 1.0,
            "yanchor": "bottom",
            "x": 1.0,
            "xanchor": "right",
            "font": {"size": 11},
        },
    )
    _from_zero(fig, [*(100 * frame["token_share"]), *scaled["kl_share_high"], *scaled["kl_share"]])
    return _notes(fig, [])


def position_chart(frame: pd.DataFrame) -> go.Figure:
    """Mean token KL per position bucket of the answer (`study.drift.by_position`), with
    95% intervals over items."""
    fig = go.Figure()
    if frame.empty:
        empty_message(fig, "No tokens in this probe.")
    else:
        hover = [
            f"answer tokens {r.bucket}: {r.tokens} tokens of {r.items} items<br>mean KL "
            f"{_interval(r.kl, r.kl_low, r.kl_high)} nats"
            for r in frame.itertuples()
        ]
        _bars(fig, frame["bucket"].tolist(), frame, "kl", hover, ORANGE)
        _from_zero(fig, [*frame["kl"], *frame["kl_high"]])
        fig.update_xaxes(type="category")
    return _notes(_layout(fig, "By position in the answer", "answer token position", KL_TITLE), [])


def domain_chart(frame: pd.DataFrame) -> go.Figure:
    """Mean token KL per probe domain (`study.drift.by_domain`), with 95% intervals over
    the domain's items."""
    fig = go.Figure()
    notes = []
    if frame.empty:
        empty_message(fig, "No items.")
    else:
        hover = [
            f"{r.domain}: {r.items} items, {r.tokens} tokens<br>mean KL "
            f"{_interval(r.kl, r.kl_low, r.kl_high)} nats"
            for r in frame.itertuples()
        ]
        _bars(fig, frame["domain"].tolist(), frame, "kl", hover, ORANGE)
        _from_zero(fig, [*frame["kl"], *frame["kl_high"]])
        fig.update_xaxes(type="category")
        if len(frame) == 1:
            notes.append("This probe has one domain.")
    return _notes(_layout(fig, "By domain", "probe domain", KL_TITLE), notes)


#: The x axes of `share_scatter`: (column, axis title, what a missing value means).
SHARE_AXES = {
    "trained": ("trained_share", "high-ppl share of the tokens trained on (loss), %"),
    "data": ("data_share", "high-ppl share of the training data's response tokens, %"),
}


def share_scatter(table: pd.DataFrame, x: str = "trained", current: str = "") -> go.Figure:
    """Across runs: the high-perplexity share of the training tokens (x: of the tokens the loss
    saw, or of the training data's response tokens; `study.drift.drift_share_table`)
    against the OOD token KL at each run's last drift round (y, with its 95% interval over
    items), one marker per run coloured by method; `current` (a run id) is outlined. Runs
    without a share are left out and named in the notes."""
    column, x_title = SHARE_AXES[x]
    fig = go.Figure()
    notes: list[str] = []
    known = table[[finite(v) for v in table[column]]] if not table.empty else table
    for _, row in table.iterrows() if not table.empty else ():
        if not finite(row[column]):
            why = row["reason"] or (
                "random positions: the share among trained tokens is not exact"
                if row["method"] == "random"
                else "not recorded"
            )
            notes.append(f"Not drawn: {row['label']} · {row['run']} ({why}).")
    for method, group in known.groupby("method", sort=False) if not known.empty else ():
        hover = [
            f"{r.label} · {r.run}<br>high-ppl share (ppl > τ = {r.tau:g}): "
            f"{100 * getattr(r, column):.1f}%<br>OOD KL at step {r.step}: "
            f"{_interval(r.kl, r.kl_low, r.kl_high)} nats (n = {r.n})"
            + (f"<br>share from {r.source}" if r.source else "")
            for r in group.itertuples()
        ]
        fig.add_trace(
            go.Scatter(
                x=[100 * v for v in group[column]],
                y=group["kl"].tolist(),
                mode="markers",
                name=str(method),
                customdata=hover,
                hovertemplate="%{customdata}<extra></extra>",
                marker={
                    "size": 11,
                    "color": method_color(str(method)),
                    "line": {
                        "width": [3 if r == current else 0.5 for r in group["run"]],
                        "color": "#1f2328",
                    },
                },
                error_y=_error_y(
                    group["kl"].tolist(), group["kl_low"].tolist(), group["kl_high"].tolist()
                ),
            )
        )
    _base_layout(fig, "High-ppl training tokens vs OOD drift", x_title, "OOD mean token KL, nats")
    fig.update_layout(
        height=CHART_HEIGHT + 40,
        margin={"l": 64, "r": 16, "t": 80, "b": 60},
        title={"font": {"size": 15}},
    )
    fig.update_xaxes(title_font={"size": 12}, zeroline=True, zerolinecolor="#d0d7de")
    fig.update_yaxes(title_font={"size": 12})
    if known.empty:
        empty_message(fig, "No run has both a high-ppl share and OOD drift.")
    else:
        _from_zero(fig, [*known["kl"], *known["kl_high"]])
        xs = [100 * float(v) for v in known[column]]
        right = max(5.0, 1.15 * max(xs))  # a little room left of 0: markers there stay whole
        fig.update_xaxes(range=[-0.04 * right, right], rangemode="normal")
        if len(known) == 1:
            notes.insert(0, "One run drawn: a trend needs more runs.")
    return _notes(fig, notes)
