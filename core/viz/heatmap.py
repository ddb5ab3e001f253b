"""Token-level perplexity heatmap as a self-contained HTML fragment.

`render_token_heatmap` returns one HTML string (inline CSS only: no scripts, external styles,
fonts or network references) that the page shows with `st.html(...)` (or
`streamlit.components.v1.html(..., scrolling=True)`). It is a pure function so tests and other
views (the masking studio passes `masked=`) can reuse it.

Design choices:
- Colour is a sequential white -> yellow -> orange -> red map on a LOG scale of perplexity
  (vmin .. vmax, clipped): ppl 1 (the model was certain) stays white, so only surprising tokens
  draw the eye. Colours are computed here, in Python, from `PPL_COLOR_STOPS`.
- Text keeps its exact whitespace (`white-space: pre-wrap`, tab-size 4). Newline characters
  are emitted as `&#10;` so the DOM holds real line breaks while the HTML source stays on one
  line (Markdown renderers cannot then mistake indented code for a code block).
- Tokens made only of whitespace get a faint marker drawn by CSS (`::before`, so copying the
  text copies the code exactly): a "↵" before a line break, a dotted underline under spaces/tabs.
- The hover tooltip is pure CSS: the text lives in `data-tip` and is shown by `::after`, so it
  can span several lines and never pollutes the selectable text.
- "Above tau" is strict (`ppl > tau`), the rule Selective Token Masking uses; such tokens get a
  dark underline when `tau` is given.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

from core import fmt
from core.data.records import ScoredExample
from core.scoring.analytics import is_control_token

# Position on the log scale (0 = vmin, 1 = vmax) -> RGB. White, then ColorBrewer YlOrRd; the
# lightness falls monotonically, so a "hotter" colour always means a higher perplexity.
PPL_COLOR_STOPS: tuple[tuple[float, tuple[int, int, int]], ...] = (
    (0.00, (255, 255, 255)),
    (0.08, (255, 247, 188)),
    (0.20, (254, 227, 145)),
    (0.33, (254, 196, 79)),
    (0.47, (254, 153, 41)),
    (0.62, (236, 112, 20)),
    (0.78, (215, 48, 31)),
    (1.00, (153, 0, 13)),
)
LEGEND_TICKS = (1.0, 2.5, 10.0, 100.0, 1000.0)
TOP_K_SHOWN = 5
_TIP_TOKEN_CHARS = 40
_RIGHT_ANCHOR_COLUMN = 60  # tooltips of tokens past this column open leftwards


def ppl_position(ppl: float, vmin: float = 1.0, vmax: float = 1000.0) -> float:
    """Where `ppl` lies on the log colour scale, in [0, 1] (clipped; NaN -> 0)."""
    if not math.isfinite(ppl):
        return 1.0 if ppl == math.inf else 0.0
    if not 0 < vmin < vmax:
        raise ValueError(f"need 0 < vmin < vmax, got vmin={vmin}, vmax={vmax}")
    lo, hi = math.log(vmin), math.log(vmax)
    x = (math.log(max(ppl, 1e-300)) - lo) / (hi - lo)
    return min(1.0, max(0.0, x))


def _interpolate(t: float) -> tuple[int, int, int]:
    for (t0, c0), (t1, c1) in zip(PPL_COLOR_STOPS, PPL_COLOR_STOPS[1:], strict=False):
        if t <= t1:
            w = 0.0 if t1 == t0 else (t - t0) / (t1 - t0)
            r, g, b = (round(lo + (hi - lo) * w) for lo, hi in zip(c0, c1, strict=True))
            return r, g, b
    return PPL_COLOR_STOPS[-1][1]


def ppl_color(ppl: float, vmin: float = 1.0, vmax: float = 1000.0) -> str:
    """Background colour (hex "#rrggbb") of a token with perplexity `ppl`."""
    r, g, b = _interpolate(ppl_position(ppl, vmin, vmax))
    return f"#{r:02x}{g:02x}{b:02x}"


def relative_luminance(hex_color: str) -> float:
    """WCAG relative luminance of "#rrggbb" (0 black .. 1 white)."""

    def channel(v: int) -> float:
        c = v / 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return 0.2126 * channel(r) + 0.7152 * channel(g) + 0.0722 * channel(b)


def _text_color(background: str) -> str:
    return "#ffffff" if relative_luminance(background) < 0.18 else "#1f2328"


def _format_ppl(ppl: float) -> str:
    """A perplexity as every page prints a value (`core.fmt.num`); "inf" when infinite."""
    if math.isinf(ppl):
        return "inf"
    if ppl >= 1e5:
        return f"{ppl:.2e}"
    return fmt.num(ppl)


def _format_tick(value: float) -> str:
    return f"{value:g}" if value < 1e4 else f"{value:.0e}"


def _token_repr(token: str) -> str:
    text = repr(token)
    if len(text) > _TIP_TOKEN_CHARS:
        text = text[: _TIP_TOKEN_CHARS - 2] + "…" + text[-1]
    return text


def _escape_text(token: str) -> str:
    """HTML-escape a token's visible text, keeping line breaks as character references."""
    return html.escape(token, quote=False).replace("\r", "&#13;").replace("\n", "&#10;")


def _escape_attr(text: str) -> str:
    return html.escape(text, quote=True).replace("\r", "&#13;").replace("\n", "&#10;")


def _whitespace_class(token: str) -> str:
    if token == "" or not token.isspace():
        return ""
    return " pl-nl" if "\n" in token else " pl-ws"


def _tooltip(example: ScoredExample, i: int, ppl: float, masked: bool, tau: float | None) -> str:
    token = example.tokens[example.response_start + i]
    lines = [_token_repr(token)]
    rank = example.rank[i] if i < len(example.rank) else None
    prob = math.exp(example.logprob[i]) if i < len(example.logprob) else float("nan")
    stats = f"ppl {_format_ppl(ppl)}  ·  p {prob:.3f}"
    if rank is not None:
        stats += f"  ·  rank {rank}"
    lines.append(stats)
    lines.append(f"response token {i}")
    if tau is not None:
        lines.append(f"ppl > τ = {fmt.tau(tau)}" if ppl > tau else f"ppl ≤ τ = {fmt.tau(tau)}")
    if masked:
        lines.append("masked (excluded from loss)")
    alternatives = example.top_tokens[i] if i < len(example.top_tokens) else []
    alt_logprobs = example.top_logprobs[i] if i < len(example.top_logprobs) else []
    if alternatives:
        lines.append(f"model's top-{min(TOP_K_SHOWN, len(alternatives))}:")
        width = max(len(_token_repr(t)) for t in alternatives[:TOP_K_SHOWN])
        for k, (alt, lp) in enumerate(zip(alternatives, alt_logprobs, strict=False)):
            if k == TOP_K_SHOWN:
                break
            mark = "  ◀" if alt == token else ""
            lines.append(f"{k + 1}. {_token_repr(alt):<{width}}  {math.exp(lp):.3f}{mark}")
    return "\n".join(lines)


def heatmap_legend_html(
    vmax: float = 1000.0,
    tau: float | None = None,
    *,
    vmin: float = 1.0,
    show_masked: bool = False,
) -> str:
    """Colour legend: a log-scale gradient bar with ticks, a tau marker and a masked swatch."""
    stops = ", ".join(
        f"{ppl_color(vmin * (vmax / vmin) ** (k / 20), vmin, vmax)} {k * 5}%" for k in range(21)
    )
    ticks = [t for t in LEGEND_TICKS if vmin <= t <= vmax]
    if vmax not in ticks:
        ticks.append(vmax)
    tick_html = "".join(
        f'<span class="pl-tick" style="left:{100 * ppl_position(t, vmin, vmax):.2f}%">'
        f"{_format_tick(t)}</span>"
        for t in ticks
    )
    tau_html = ""
    if tau is not None:
        left = 100 * ppl_position(tau, vmin, vmax)
        tau_html = (
            f'<span class="pl-tau" data-tau="{tau:g}" style="left:{left:.2f}%">'
            f'<span class="pl-tau-label">τ = {fmt.tau(tau)}</span></span>'
        )
    masked_html = (
        '<span class="pl-leg-item"><span class="pl-swatch pl-m">abc</span>'
        "masked (excluded from loss)</span>"
        if show_masked
        else ""
    )
    above_html = (
        '<span class="pl-leg-item"><span class="pl-swatch pl-hi">abc</span>ppl &gt; τ</span>'
        if tau is not None
        else ""
    )
    return (
        '<div class="pl-legend">'
        '<span class="pl-leg-title">token perplexity (log scale)</span>'
        f'<div class="pl-bar-wrap"><div class="pl-bar" style="background:linear-gradient('
        f'to right, {stops})"></div>{tau_html}<div class="pl-ticks">{tick_html}</div></div>'
        f"{above_html}{masked_html}</div>"
    )


def render_token_heatmap(
    example: ScoredExample,
    *,
    tau: float | None = None,
    masked: Sequence[bool] | None = None,
    show_prompt: bool = True,
    vmin: float = 1.0,
    vmax: float = 1000.0,
    max_tokens: int | None = None,
) -> str:
    """HTML fragment showing the example's response tokens coloured by perplexity.

    `masked`, if given, has one bool per response token; masked tokens are struck through on a
    hatched grey background. `max_tokens` caps the number of response tokens drawn (a note says
    how many were left out). Prompt tokens (before `response_start`, chat-template tokens
    included) are shown dimmed and uncoloured in a collapsible block unless `show_prompt` is
    False. Each response token is a `span.pl-t` with `data-i` (response index) and `data-ppl`.
    """
    n = example.n_response
    if len(example.logprob) != n:
        raise ValueError(
            f"example {example.id!r}: {len(example.logprob)} logprobs for {n} response tokens"
        )
    if masked is not None and len(masked) != n:
        raise ValueError(f"masked has {len(masked)} entries for {n} response tokens")
    ppl = example.ppl
    shown = n if max_tokens is None else max(0, min(n, max_tokens))

    parts: list[str] = [f"<style>{_CSS}</style>", '<div class="pl-root">']
    parts.append(_header_html(example, ppl, tau, masked))
    parts.append(heatmap_legend_html(vmax, tau, vmin=vmin, show_masked=masked is not None))

    if show_prompt and example.response_start > 0:
        parts.append(
            '<details class="pl-prompt" open><summary>prompt · '
            f"{example.response_start} tokens (chat template included, not scored)</summary>"
            '<div class="pl-text">'
        )
        for token in example.tokens[: example.response_start]:
            classes = "pl-p" + _whitespace_class(token)
            if is_control_token(token):
                classes += " pl-sp"
            parts.append(f'<span class="{classes}">{_escape_text(token)}</span>')
        parts.append("</div></details>")

    parts.append('<div class="pl-resp"><div class="pl-text">')
    column = 0
    for i in range(shown):
        token = example.tokens[example.response_start + i]
        value = ppl[i]
        is_masked = bool(masked[i]) if masked is not None else False
        above = None if tau is None else value > tau
        background = ppl_color(value, vmin, vmax)
        classes = "pl-t" + _whitespace_class(token)
        if is_control_token(token):
            classes += " pl-sp"
        if above:
            classes += " pl-hi"
        if is_masked:
            classes += " pl-m"
        if column > _RIGHT_ANCHOR_COLUMN:
            classes += " pl-r"
        style = f"--c:{background};background:{background};color:{_text_color(background)}"
        tip = _tooltip(example, i, value, is_masked, tau)
        parts.append(
            f'<span class="{classes}" data-i="{i}" data-ppl="{value:.6g}" style="{style}" '
            f'data-tip="{_escape_attr(tip)}">{_escape_text(token)}</span>'
        )
        column = len(token) - token.rfind("\n") - 1 if "\n" in token else column + len(token)
    parts.append("</div>")
    if shown < n:
        parts.append(f'<div class="pl-more">… {n - shown} more response tokens not shown</div>')
    parts.append("</div></div>")
    return "".join(parts)


def _header_html(
    example: ScoredExample,
    ppl: Sequence[float],
    tau: float | None,
    masked: Sequence[bool] | None,
) -> str:
    n = example.n_response
    items = [
        f'<span class="pl-src">{html.escape(example.source)}</span>',
        f"<span>{html.escape(example.id)}</span>",
        f"<span>{fmt.count(n)} response tokens</span>",
        f"<span>sequence ppl <b>{_format_ppl(example.seq_ppl)}</b></span>",
    ]
    if tau is not None and n:
        above = sum(1 for v in ppl if v > tau)
        items.append(
            f"<span>ppl &gt; τ = {fmt.tau(tau)}: <b>{fmt.count(above)}</b> "
            f"({fmt.share(above / n)})</span>"
        )
    if masked is not None and n:
        k = sum(1 for m in masked if m)
        items.append(f"<span>masked: <b>{fmt.count(k)}</b> ({fmt.share(k / n)})</span>")
    if example.truncated:
        items.append('<span class="pl-warn">truncated</span>')
    return '<div class="pl-head">' + "".join(items) + "</div>"


_CSS = " ".join(
    line.strip()
    for line in """
.pl-root { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color: #1f2328; background: #ffffff; font-size: 14px; line-height: 1.5;
  border: 1px solid #d0d7de; border-radius: 8px; padding: 10px 14px 12px 14px; }
.pl-head { display: flex; flex-wrap: wrap; gap: 4px 14px; align-items: baseline;
  font-size: 13px; color: #57606a; margin-bottom: 6px; }
.pl-head b { color: #1f2328; }
.pl-src { font-weight: 600; color: #1f2328; background: #eef1f4; border-radius: 4px;
  padding: 0 6px; }
.pl-warn { color: #9a6700; font-weight: 600; }
.pl-legend { display: flex; flex-wrap: wrap; align-items: center; gap: 18px 16px;
  font-size: 12px; color: #57606a; margin: 18px 0 12px 0; }
.pl-leg-title { white-space: nowrap; }
.pl-bar-wrap { position: relative; width: 300px; height: 30px; margin: 0 14px 0 6px; }
.pl-bar { height: 12px; border: 1px solid #d0d7de; border-radius: 3px; }
.pl-ticks { position: relative; height: 16px; }
.pl-tick { position: absolute; top: 1px; transform: translateX(-50%); font-size: 11px;
  font-variant-numeric: tabular-nums; }
.pl-tick::before { content: ""; position: absolute; left: 50%; top: -4px; height: 4px;
  border-left: 1px solid #8c959f; }
.pl-tau { position: absolute; top: -4px; height: 20px; border-left: 2px solid #1f2328; }
.pl-tau-label { position: absolute; left: 3px; top: -13px; font-size: 11px; font-weight: 600;
  color: #1f2328; white-space: nowrap; }
.pl-leg-item { display: inline-flex; align-items: center; gap: 5px; }
.pl-swatch { font-family: ui-monospace, monospace; padding: 0 3px; border-radius: 2px; }
.pl-prompt { margin: 0 0 10px 0; border-left: 3px solid #d0d7de; padding-left: 10px; }
.pl-prompt summary { cursor: pointer; font-size: 12px; color: #6e7781; margin-bottom: 4px; }
.pl-resp { border-left: 3px solid #f0883e; padding-left: 10px; }
.pl-text { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono",
  monospace; font-size: 13px; line-height: 1.75; white-space: pre-wrap; word-break: break-word;
  tab-size: 4; -moz-tab-size: 4; }
.pl-p { color: #8c959f; }
.pl-sp { font-size: 11px; color: #8c959f; background: #f3f4f6; border-radius: 3px; }
.pl-t { position: relative; border-radius: 2px; padding: 1px 0; cursor: default; }
.pl-t:hover { outline: 1.5px solid #0969da; z-index: 3; }
.pl-ws { box-shadow: inset 0 -1px 0 rgba(110, 119, 129, 0.35); }
.pl-nl::before { content: "↵"; color: #8c959f; opacity: 0.55; font-size: 11px; }
.pl-p.pl-nl::before { opacity: 0.35; }
.pl-hi { box-shadow: inset 0 -2px 0 rgba(31, 35, 40, 0.85); }
.pl-m { text-decoration: line-through; text-decoration-color: #24292f;
  text-decoration-thickness: 1.5px; color: #57606a !important;
  background: repeating-linear-gradient(135deg, #c9d1d9 0 2px, #eef1f4 2px 5px) !important;
  box-shadow: inset 0 -3px 0 var(--c, #c9d1d9); }
.pl-t::after { content: attr(data-tip); display: none; position: absolute; left: 0;
  top: calc(100% + 4px); z-index: 10; min-width: 180px; padding: 6px 9px; white-space: pre;
  font-size: 12px; line-height: 1.45; color: #f0f3f6; background: #1f2328; border-radius: 6px;
  box-shadow: 0 4px 14px rgba(0, 0, 0, 0.25); text-decoration: none; pointer-events: none; }
.pl-t.pl-r::after { left: auto; right: 0; }
.pl-t:hover::after { display: block; }
.pl-more { margin-top: 6px; font-size: 12px; color: #6e7781; font-style: italic; }
""".splitlines()
    if line.strip()
)


def delta_color(delta: float, limit: float = 3.0) -> str:
    """Diverging colour for a change in ln-perplexity: blue = easier after fine-tuning, white =
    unchanged, red = harder; saturates at ±`limit` nats."""
    t = max(-1.0, min(1.0, delta / limit)) if math.isfinite(delta) else 1.0
    target = (33, 102, 172) if t < 0 else (178, 24, 43)
    a = abs(t)
    r, g, b = (round(255 + (c - 255) * a) for c in target)
    return f"#{r:02x}{g:02x}{b:02x}"


def render_delta_heatmap(base: ScoredExample, tuned: ScoredExample, limit: float = 3.0) -> str:
    """Response tokens coloured by how fine-tuning changed their perplexity (Δ ln ppl).

    Both records must be scores of the same example (same token ids); hovering a token shows
    its perplexity before and after.
    """
    if base.token_ids != tuned.token_ids or base.response_start != tuned.response_start:
        raise ValueError(f"example {base.id!r}: base and fine-tuned scores do not line up")
    before, after = base.ppl, tuned.ppl
    parts = [f"<style>{_CSS}</style>", '<div class="pl-root">']
    deltas = [math.log(a) - math.log(b) for a, b in zip(after, before, strict=True)]
    harder = sum(d > 0 for d in deltas)
    parts.append(
        '<div class="pl-head">'
        f'<span class="pl-src">Δ after fine-tuning</span><span>{html.escape(base.id)}</span>'
        f"<span>seq ppl <b>{_format_ppl(base.seq_ppl)}</b> → <b>{_format_ppl(tuned.seq_ppl)}</b>"
        f"</span><span>{harder} of {len(deltas)} tokens harder</span></div>"
    )
    stops = ", ".join(delta_color(v * limit, limit) for v in (-1, -0.5, 0, 0.5, 1))
    parts.append(
        '<div class="pl-legend"><span class="pl-leg-title">Δ ln ppl</span>'
        f'<div class="pl-bar-wrap"><div class="pl-bar" style="background:linear-gradient('
        f'to right, {stops})"></div><div class="pl-ticks">'
        f'<span class="pl-tick" style="left:0%;transform:none;white-space:nowrap">−{limit:g} '
        'easier</span><span class="pl-tick" style="left:50%">0</span><span class="pl-tick" '
        f'style="left:100%;transform:translateX(-100%);white-space:nowrap">+{limit:g} harder'
        "</span></div></div></div>"
    )
    parts.append('<div class="pl-resp"><div class="pl-text">')
    for i, token in enumerate(base.response_tokens):
        color = delta_color(deltas[i], limit)
        tip = (
            f"{_token_repr(token)}\nppl {_format_ppl(before[i])} → {_format_ppl(after[i])}\n"
            f"Δ ln ppl {deltas[i]:+.2f}"
        )
        parts.append(
            f'<span class="pl-t{_whitespace_class(token)}" data-i="{i}" '
            f'data-delta="{deltas[i]:.6g}" style="--c:{color};background:{color};'
            f'color:{_text_color(color)}" data-tip="{_escape_attr(tip)}">{_escape_text(token)}</span>'
        )
    parts.append("</div></div></div>")
    return "".join(parts)


# ------------------------------------------------------------------ shared with other token views


def heatmap_css() -> str:
    """The heatmaps' stylesheet as a `<style>` element, for other token views that draw
    `token_span`s (the drift view) and so share the look and the CSS-only hover."""
    return f"<style>{_CSS}</style>"


def token_repr(token: str) -> str:
    """A token as a hover names it: its Python repr, shortened in the middle when long."""
    return _token_repr(token)


def token_span(
    token: str,
    index: int,
    background: str,
    tip: str,
    *,
    right: bool = False,
    data: dict[str, str] | None = None,
) -> str:
    """One coloured, hoverable token (`span.pl-t`) as the heatmaps draw it: its exact text
    (line breaks kept, whitespace marked, control tokens dimmed), `background` with a readable
    text colour, `tip` shown on hover (pure CSS, several lines; `right` opens it leftwards for
    tokens far right on their line) and `data-*` attributes (`data-i` = `index`)."""
    classes = "pl-t" + _whitespace_class(token)
    if is_control_token(token):
        classes += " pl-sp"
    if right:
        classes += " pl-r"
    attrs = "".join(f' data-{k}="{_escape_attr(v)}"' for k, v in (data or {}).items())
    style = f"--c:{background};background:{background};color:{_text_color(background)}"
    return (
        f'<span class="{classes}" data-i="{index}"{attrs} style="{style}" '
        f'data-tip="{_escape_attr(tip)}">{_escape_text(token)}</span>'
    )


def prompt_span(token: str) -> str:
    """One prompt token as the heatmaps show prompts: dimmed, uncoloured, not hoverable."""
    classes = "pl-p" + _whitespace_class(token)
    if is_control_token(token):
        classes += " pl-sp"
    return f'<span class="{classes}">{_escape_text(token)}</span>'
