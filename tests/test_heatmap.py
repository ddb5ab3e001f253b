"""Token heatmap HTML: what a user sees and hovers, checked on hand-made scored examples."""

from __future__ import annotations

import math
import re
from html.parser import HTMLParser

import pytest

from core.viz.heatmap import (
    heatmap_legend_html,
    ppl_color,
    ppl_position,
    relative_luminance,
    render_token_heatmap,
)
from tests.factories import PROMPT_TOKENS, make_example


class Span:
    def __init__(self, attrs: dict[str, str | None]):
        self.attrs = attrs
        self.text = ""

    @property
    def classes(self) -> set[str]:
        return set((self.attrs.get("class") or "").split())


class SpanCollector(HTMLParser):
    """Collects every <span> with its attributes and its own (direct) text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.spans: list[Span] = []
        self._stack: list[Span | None] = []

    def handle_starttag(self, tag, attrs):
        if tag == "span":
            span = Span(dict(attrs))
            self.spans.append(span)
            self._stack.append(span)

    def handle_endtag(self, tag):
        if tag == "span" and self._stack:
            self._stack.pop()

    def handle_data(self, data):
        if self._stack and self._stack[-1] is not None:
            self._stack[-1].text += data


def spans_of(html_text: str) -> list[Span]:
    parser = SpanCollector()
    parser.feed(html_text)
    return parser.spans


def response_spans(html_text: str) -> list[Span]:
    return [s for s in spans_of(html_text) if "data-i" in s.attrs]


def prompt_spans(html_text: str) -> list[Span]:
    return [s for s in spans_of(html_text) if "pl-p" in s.classes]


CODE_TOKENS = ["def", " f", "(x", "):", "\n", "    ", "return", " x", "\n", "<|eot_id|>"]
CODE_PPL = [1.0, 3.0, 1.2, 1.1, 1.0, 1.05, 40.0, 1.0, 2.0, 1.0]


def test_one_span_per_response_token_with_index_and_ppl():
    ex = make_example(ppl=CODE_PPL, tokens=CODE_TOKENS)
    spans = response_spans(render_token_heatmap(ex))
    assert len(spans) == ex.n_response
    assert [int(s.attrs["data-i"]) for s in spans] == list(range(ex.n_response))
    for span, value in zip(spans, CODE_PPL, strict=True):
        assert float(span.attrs["data-ppl"]) == pytest.approx(value, rel=1e-5)


def test_token_text_is_escaped():
    ex = make_example(
        ppl=[2.0] * 6, tokens=["print(", '"', "<script>", "alert(1)", "</script>", "&amp;"]
    )
    out = render_token_heatmap(ex)
    assert "<script" not in out.lower()
    assert "&lt;script&gt;" in out
    assert "&amp;amp;" in out  # a literal "&amp;" token is shown as typed
    texts = [s.text for s in response_spans(out)]
    assert texts == ["print(", '"', "<script>", "alert(1)", "</script>", "&amp;"]


def test_whitespace_indentation_and_newlines_preserved():
    ex = make_example(
        ppl=[1.5] * 7, tokens=["def", " f", "():", "\n    return x", "\n", "\t", "pass"]
    )
    out = render_token_heatmap(ex)
    spans = response_spans(out)
    # What the browser shows is the response, character for character.
    assert "".join(s.text for s in spans) == ex.response
    assert spans[3].text == "\n    return x"
    assert spans[5].text == "\t"
    # Line breaks are real newline characters (pre-wrap), encoded so the HTML source has none.
    assert "&#10;    return x" in out
    assert "\n" not in out
    assert "white-space: pre-wrap" in out


def test_whitespace_only_tokens_get_visible_marker_class():
    ex = make_example(ppl=[1.0] * 5, tokens=["x", "\n", "    ", " y", "\t"])
    spans = response_spans(render_token_heatmap(ex))
    assert "pl-nl" in spans[1].classes
    assert "pl-ws" in spans[2].classes and "pl-ws" in spans[4].classes
    assert not ({"pl-nl", "pl-ws"} & spans[0].classes)
    assert not ({"pl-nl", "pl-ws"} & spans[3].classes)


def test_colour_gets_hotter_with_perplexity():
    grid = [1.0 * 1.1**k for k in range(80)]  # 1 .. ~1900
    lum = [relative_luminance(ppl_color(v)) for v in grid]
    assert all(a >= b for a, b in zip(lum, lum[1:], strict=False))
    anchors = [relative_luminance(ppl_color(v)) for v in (1, 2.5, 10, 100, 1000)]
    assert all(a > b for a, b in zip(anchors, anchors[1:], strict=False))
    assert ppl_color(1.0) == "#ffffff"
    red, green, blue = (int(ppl_color(1000)[i : i + 2], 16) for i in (1, 3, 5))
    assert red > 2 * green and red > 2 * blue  # the hot end is red


def test_colour_scale_is_log_and_clipped():
    assert ppl_position(1.0) == 0.0
    assert ppl_position(1000.0) == 1.0
    assert ppl_position(math.sqrt(1000.0)) == pytest.approx(0.5)
    assert ppl_color(5000) == ppl_color(1000)
    assert ppl_color(0.5) == ppl_color(1.0)
    assert ppl_position(10.0, vmax=100.0) == pytest.approx(0.5)


def test_span_background_is_the_ppl_colour():
    ex = make_example(ppl=CODE_PPL, tokens=CODE_TOKENS)
    for span, value in zip(response_spans(render_token_heatmap(ex)), CODE_PPL, strict=True):
        assert f"background:{ppl_color(value)}" in span.attrs["style"]


def test_prompt_dimmed_uncoloured_and_optional():
    ex = make_example(ppl=CODE_PPL, tokens=CODE_TOKENS)
    out = render_token_heatmap(ex)
    prompts = prompt_spans(out)
    assert [s.text for s in prompts] == PROMPT_TOKENS
    for span in prompts:
        assert "style" not in span.attrs and "data-ppl" not in span.attrs
    assert "pl-sp" in prompts[0].classes  # chat-template control token, drawn as a small tag
    assert "pl-sp" not in prompts[1].classes
    hidden = render_token_heatmap(ex, show_prompt=False)
    assert prompt_spans(hidden) == []
    assert "start_header_id" not in hidden
    assert len(response_spans(hidden)) == ex.n_response


def test_tooltip_shows_token_stats_and_top5():
    alts = [" return", " yield", " pass", " raise", " print", " break"]
    probs = [0.6, 0.2, 0.1, 0.05, 0.03, 0.02]
    ex = make_example(
        ppl=[1.0, 40.0], tokens=["    ", "return"], top_tokens=[alts, alts], top_probs=[probs] * 2
    )
    tip = response_spans(render_token_heatmap(ex))[1].attrs["data-tip"]
    lines = tip.split("\n")
    assert lines[0] == "'return'"  # repr-style, so whitespace would be visible
    assert "ppl 40  ·" in tip and "p 0.025" in tip and "rank 2" in tip  # core.fmt.num
    assert "top-5" in tip
    for alt, prob in zip(alts[:5], probs[:5], strict=True):
        assert re.search(re.escape(repr(alt)) + rf"\s+{prob:.3f}", tip)
    assert repr(alts[5]) not in tip
    ws_tip = response_spans(render_token_heatmap(ex))[0].attrs["data-tip"]
    assert ws_tip.split("\n")[0] == "'    '"


def test_tooltip_marks_the_actual_token_among_alternatives():
    ex = make_example(ppl=[2.0], tokens=["x"], top_tokens=[["y", "x"]], top_probs=[[0.5, 0.5]])
    tip = response_spans(render_token_heatmap(ex))[0].attrs["data-tip"]
    assert "2. 'x'" in tip and "◀" in tip.split("\n")[-1]


def test_masked_tokens_struck_through_with_tooltip():
    ex = make_example(ppl=CODE_PPL, tokens=CODE_TOKENS)
    masked = [p > 2.5 for p in CODE_PPL]
    out = render_token_heatmap(ex, tau=2.5, masked=masked)
    for span, is_masked in zip(response_spans(out), masked, strict=True):
        assert ("pl-m" in span.classes) == is_masked
        assert ("masked (excluded from loss)" in span.attrs["data-tip"]) == is_masked
    assert "line-through" in out
    assert "masked: <b>2</b>" in out
    assert "ppl > τ = 2.5" in response_spans(out)[6].attrs["data-tip"]
    assert "ppl ≤ τ = 2.5" in response_spans(out)[0].attrs["data-tip"]
    with pytest.raises(ValueError):
        render_token_heatmap(ex, masked=masked[:-1])


def test_tau_highlights_tokens_strictly_above():
    ex = make_example(ppl=[2.0, 3.0, 1.0], tokens=["a", "b", "c"])
    tau = ex.ppl_array()[0]  # a token exactly at tau is not above it
    spans = response_spans(render_token_heatmap(ex, tau=tau))
    assert ["pl-hi" in s.classes for s in spans] == [False, True, False]
    assert all("pl-hi" not in s.classes for s in response_spans(render_token_heatmap(ex)))


def test_legend_ticks_and_tau_marker():
    legend = heatmap_legend_html(1000.0, 2.5)
    for tick in ("1", "2.5", "10", "100", "1000"):
        assert f">{tick}</span>" in legend
    marker = re.search(r'class="pl-tau" data-tau="2.5" style="left:([\d.]+)%"', legend)
    assert marker
    assert float(marker.group(1)) == pytest.approx(100 * math.log(2.5) / math.log(1000), abs=0.01)
    assert "τ = 2.5" in legend
    assert "linear-gradient" in legend
    assert "pl-tau" not in heatmap_legend_html(1000.0, None)
    assert 'class="pl-tau"' in render_token_heatmap(make_example(ppl=[3.0], tokens=["a"]), tau=2.5)


def test_fragment_is_self_contained():
    out = render_token_heatmap(make_example(ppl=CODE_PPL, tokens=CODE_TOKENS), tau=2.5)
    lowered = out.lower()
    for forbidden in ("<script", "<link", "@import", "url(", "http://", "https://", "src="):
        assert forbidden not in lowered
    assert lowered.startswith("<style>")


def test_max_tokens_truncates_with_note():
    ex = make_example(ppl=[2.0] * 10, tokens=["a"] * 10)
    out = render_token_heatmap(ex, max_tokens=4)
    assert len(response_spans(out)) == 4
    assert "6 more response tokens not shown" in out


def test_length_mismatch_is_an_error():
    ex = make_example(ppl=[2.0, 2.0], tokens=["a", "b"])
    ex.logprob = ex.logprob[:1]
    with pytest.raises(ValueError):
        render_token_heatmap(ex)


def test_thousand_token_response_renders_every_token():
    words = ["def", " f", "(", "x", "):", "\n", "    ", "return", " x", " +", " 1", "\n"]
    tokens = [words[i % len(words)] for i in range(1000)]
    ppl = [1.0 + (i * 37 % 500) for i in range(1000)]
    ex = make_example(ppl=ppl, tokens=tokens)
    out = render_token_heatmap(ex, tau=2.5, masked=[v > 2.5 for v in ppl])
    assert out.count("data-i=") == 1000
    assert len(response_spans(out)) == 1000


def test_tau_and_shares_print_as_on_the_cards():
    """A solved τ (many digits) prints as the Masking studio's τ card does, in the header, the
    colour legend and the tooltips; the header's shares print as its share cards do."""
    from core import fmt

    ex = make_example(ppl=CODE_PPL, tokens=CODE_TOKENS)
    tau = 5.24648
    masked = [p > tau for p in CODE_PPL]
    out = render_token_heatmap(ex, tau=tau, masked=masked)
    above = sum(p > tau for p in CODE_PPL)
    assert (
        f"ppl &gt; τ = {fmt.tau(tau)}: <b>{above}</b> ({fmt.share(above / len(CODE_PPL))})" in out
    )
    assert f'<span class="pl-tau-label">τ = {fmt.tau(tau)}</span>' in out
    assert "5.24648" not in out.replace('data-tau="5.24648"', "")
    assert f"τ = {fmt.tau(tau)}" in response_spans(out)[0].attrs["data-tip"]
