"""Chart builders: traces per source, log axes, tau marks and plotted data equal to the inputs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from core import fmt
from core.masking.rules import MaskConfig, PplIndex, compute_masks
from core.scoring.analytics import (
    category_shares,
    share_above_tau,
    share_vs_tau,
    token_ppl_frame,
)
from core.scoring.tokens import TokenScores
from core.viz.charts import (
    FALLBACK_COLORS,
    PLOTLY_CONFIG,
    SOURCE_COLORS,
    category_share_chart,
    data_traces,
    masked_share_histogram,
    masked_share_marker_text,
    masking_curve_figure,
    plotly_config,
    ppl_cdf,
    ppl_histogram,
    seq_ppl_box,
    share_vs_tau_chart,
    source_color,
    source_label,
    spike_plot,
)
from tests.factories import columns, make_example, scores_of

RECORDS = {
    "ground_truth": [make_example("g1", [1.0, 30.0, 2.0, 400.0]), make_example("g2", [5.0, 1.1])],
    "self_output": [make_example("s1", [1.0, 1.2, 1.05]), make_example("s2", [1.3])],
    "rephrase": [make_example("r1", [1.5, 2.0, 6.0])],
}
#: The same sources as the dataset-level charts take them: columns.
GROUPS = columns(RECORDS)


def tau_shapes(fig: go.Figure) -> list:
    return [s for s in fig.layout.shapes if s.name == "tau"]


def assert_titled(fig: go.Figure) -> None:
    assert fig.layout.title.text
    assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text
    fig.to_json()  # valid, serialisable figure


def test_spike_plot_traces_data_and_tau_line():
    examples = {
        "ground_truth": RECORDS["ground_truth"][0],
        "self_output": RECORDS["self_output"][0],
    }
    fig = spike_plot(examples, tau=2.5)
    assert [t.name for t in data_traces(fig)] == ["Ground truth", "Self-Output"]
    for trace, (source, ex) in zip(data_traces(fig), examples.items(), strict=True):
        assert trace.meta["source"] == source
        assert list(trace.x) == list(range(ex.n_response))
        np.testing.assert_allclose(trace.y, ex.ppl)
        assert trace.line.color == SOURCE_COLORS[source]
    assert fig.layout.yaxis.type == "log"
    (line,) = tau_shapes(fig)
    assert line.y0 == line.y1 == 2.5
    # τ is named in the legend, not by a label drawn over the curves
    assert not fig.layout.annotations
    assert [t.name for t in fig.data if t not in data_traces(fig)] == ["τ = 2.5"]
    assert_titled(fig)
    assert tau_shapes(spike_plot(examples)) == []


def test_ppl_histogram_per_source_log_bins_and_tau():
    frame = token_ppl_frame(GROUPS)
    fig = ppl_histogram(frame, tau=2.5, bins=10)
    traces = data_traces(fig)
    assert [t.meta["source"] for t in traces] == ["ground_truth", "self_output", "rephrase"]
    assert fig.layout.xaxis.type == "log"
    for trace in traces:
        part = frame[frame["source"] == trace.meta["source"]]
        assert sum(trace.meta["counts"]) == len(part)
        assert sum(trace.y[:-1]) == pytest.approx(1.0)  # share of the source's tokens
        edges = np.asarray(trace.x)  # log-spaced over ln ppl
        assert len(edges) == 11 and np.all(
            np.diff(np.log(edges)) == pytest.approx(np.log(edges[1] / edges[0]))
        )
        np.testing.assert_allclose(trace.meta["edges_ppl"], np.exp(edges))
    (line,) = tau_shapes(fig)
    assert line.x0 == pytest.approx(math.log(2.5))  # the axis is ln ppl: τ sits at ln τ
    assert [t.name for t in fig.data if t not in traces] == ["τ = 2.5"]
    assert_titled(fig)
    counts = ppl_histogram(frame, log_x=False, normalize=False, bins=5)
    assert counts.layout.xaxis.type != "log"
    assert sum(counts.data[0].y[:-1]) == len(frame[frame["source"] == "ground_truth"])


def test_ppl_histogram_spreads_tokens_near_one_over_many_bins():
    """Most tokens have ppl within a few percent of 1 and a few reach 10^6: bins log-spaced over
    ppl itself put over half the mass in the first of them; here no bin holds a fifth."""
    rng = np.random.default_rng(0)
    nll = np.concatenate([rng.exponential(0.05, 6000), rng.exponential(2.0, 4000), [13.8]])
    frame = pd.DataFrame({"source": "ground_truth", "ppl": np.exp(nll)})
    fig = ppl_histogram(frame, tau=2.5)
    (trace,) = data_traces(fig)
    shares = np.asarray(trace.y[:-1])
    assert shares.max() < 0.2
    old_first_bin = np.mean(np.exp(nll) < np.logspace(0, math.log10(np.exp(13.8)), 61)[1])
    assert old_first_bin > 0.5  # what the old bins showed
    # tick labels are perplexities, the same size for all: no plotly default log labels
    assert list(fig.layout.xaxis.ticktext)[:3] == ["1.001", "1.01", "1.1"]
    np.testing.assert_allclose(
        fig.layout.xaxis.tickvals,
        [
            math.log(float(t.replace("k", "e3").replace("M", "e6")))
            for t in fig.layout.xaxis.ticktext
        ],
    )
    # hover text is preformatted with the app's number rule
    assert trace.customdata[0].startswith("ppl ≤ ") and trace.customdata[0].endswith(
        f"{fmt.share(shares[0])} of tokens"
    )


def test_ppl_cdf_is_the_empirical_cdf():
    frame = token_ppl_frame(GROUPS)
    fig = ppl_cdf(frame, tau=2.5)
    assert len(data_traces(fig)) == 3
    assert not fig.layout.annotations  # the τ label is a legend entry, not over the curves
    for trace in data_traces(fig):
        ppl = np.sort(frame.loc[frame["source"] == trace.meta["source"], "ppl"].to_numpy())
        np.testing.assert_allclose(trace.x, ppl)
        np.testing.assert_allclose(trace.y, np.arange(1, len(ppl) + 1) / len(ppl))
    assert fig.layout.xaxis.type == "log"
    assert tau_shapes(fig)[0].x0 == 2.5
    assert_titled(fig)


def test_ppl_cdf_downsamples_large_sources():
    frame = pd.DataFrame({"source": ["gt"] * 10_000, "ppl": np.linspace(1, 100, 10_000)})
    trace = ppl_cdf(frame, max_points=500).data[0]
    assert len(trace.x) <= 500 and trace.y[-1] == 1.0 and trace.x[-1] == 100.0


def test_share_vs_tau_chart_data_and_current_tau():
    curves = share_vs_tau(GROUPS, [1.5, 2.0, 2.5, 5.0, 10.0, 100.0])
    fig = share_vs_tau_chart(curves, current_tau=2.5)
    lines = [t for t in data_traces(fig) if not (t.meta or {}).get("current_tau")]
    markers = [t for t in fig.data if (t.meta or {}).get("current_tau")]
    assert [t.meta["source"] for t in lines] == list(GROUPS)
    for trace in lines:
        part = curves[curves["source"] == trace.meta["source"]]
        np.testing.assert_allclose(trace.x, part["tau"])
        np.testing.assert_allclose(trace.y, part["share"])
    for marker in markers:
        part = curves[(curves["source"] == marker.meta["source"]) & (curves["tau"] == 2.5)]
        assert marker.x[0] == 2.5 and marker.y[0] == pytest.approx(part["share"].iloc[0])
    assert len(markers) == 3
    assert fig.layout.xaxis.type == "log"
    assert tau_shapes(fig)[0].x0 == 2.5
    assert any(s.type == "rect" and s.y0 == 0.2 and s.y1 == 0.25 for s in fig.layout.shapes)
    # the band's and τ's labels are legend entries, never text over the curves
    assert not fig.layout.annotations
    labels = [t.name for t in fig.data if t not in data_traces(fig)]
    assert labels == ["paper's rule of thumb: 20%–25% masked", "τ = 2.5"]
    assert_titled(fig)
    # band + curve + τ: three entries wrap above the plot onto the title, so they go below
    one = share_vs_tau_chart(curves[curves["source"] == next(iter(GROUPS))], current_tau=2.5)
    for chart in (fig, one):
        legend = chart.layout.legend
        assert (legend.yref, legend.yanchor, legend.y) == ("container", "bottom", 0)


def test_share_vs_tau_marker_shows_the_exact_share_the_table_shows():
    """The marker's text is the share the page's table prints (pooled ppl > τ), even when τ is
    not on the curve's grid, and the curve passes through it."""
    curves = share_vs_tau(GROUPS, [1.05, 3.0, 100.0])
    above = share_above_tau(GROUPS, 2.5).set_index("source")["share"]
    fig = share_vs_tau_chart(curves, current_tau=2.5, at_tau=above.to_dict())
    for source in GROUPS:
        (text,) = masked_share_marker_text(fig, source)
        assert text == fmt.share(above[source])
        (line,) = [
            t
            for t in data_traces(fig)
            if t.meta.get("source") == source and not t.meta.get("current_tau")
        ]
        assert above[source] == pytest.approx(np.asarray(line.y)[np.asarray(line.x) == 2.5][0])


def test_category_share_chart_grouped_all_vs_high():
    df = category_shares(GROUPS, tau=2.5)
    fig = category_share_chart(df)
    assert fig.data[0].customdata[0] == fmt.share(df["share_all"].iloc[0])
    assert fig.layout.barmode == "group"
    assert len(fig.data) == 2 * len(GROUPS)
    for trace in fig.data:
        part = df[df["source"] == trace.meta["source"]].set_index("category")
        column = "share_all" if trace.meta["subset"] == "all" else "share_high"
        assert list(trace.x) == list(part.index)
        np.testing.assert_allclose(trace.y, part[column].to_numpy())
        assert source_color(trace.meta["source"]) in str(trace.marker.line.color)
    assert "ppl > 2.5" in fig.data[1].name
    assert_titled(fig)


def test_seq_ppl_box_values():
    fig = seq_ppl_box(GROUPS)
    for trace, (source, examples) in zip(fig.data, RECORDS.items(), strict=True):
        assert trace.name == source_label(source)
        np.testing.assert_allclose(trace.y, [ex.seq_ppl for ex in examples])
    assert fig.layout.yaxis.type == "log"
    # every tick is given, so "10" is printed like "2" and "5" (plotly's own log labels are not)
    assert list(fig.layout.yaxis.ticktext) == ["1", "2", "5", "10"]  # data: 1.1 to 12.4
    assert_titled(fig)


def test_colours_consistent_across_charts():
    frame = token_ppl_frame(GROUPS)
    hist = ppl_histogram(frame)
    cdf = ppl_cdf(frame)
    for a, b in zip(data_traces(hist), data_traces(cdf), strict=True):
        assert a.line.color == b.line.color == source_color(a.meta["source"])
    assert set(SOURCE_COLORS) >= {"ground_truth", "self_output", "rephrase", "generated"}
    assert len(set(SOURCE_COLORS.values())) == len(SOURCE_COLORS)
    assert source_color("my scorer") == source_color("my scorer") in FALLBACK_COLORS


def test_plotly_config_exports_png():
    assert PLOTLY_CONFIG["toImageButtonOptions"]["format"] == "png"
    config = plotly_config("spike_plot")
    assert config["toImageButtonOptions"] == {"format": "png", "filename": "spike_plot", "scale": 2}
    assert PLOTLY_CONFIG["toImageButtonOptions"]["filename"] == "perplexity_lens"  # not mutated


def _near_one_index() -> tuple[TokenScores, PplIndex]:
    """Two examples whose tokens nearly all have ppl a hair above 1 (as a model's own answers
    do): the masked share jumps from 100% right at τ = 1."""
    ppl = [[1.0, 1.0001, 1.0002, 1.001, 1.01, 1.02, 3.0, 40.0], [1.00005, 1.003, 1.5, 2.0, 9.0]]
    scores = scores_of([make_example(f"e{i}", p) for i, p in enumerate(ppl)])
    return scores, PplIndex.from_scores(scores)


@pytest.mark.parametrize(
    "config",
    [
        MaskConfig(tau=1.0),  # the card read 99.9% and the marker 94.0%
        MaskConfig(tau=2.5),
        MaskConfig(mode="low", tau=None, target_share=0.25),  # 25.0% vs 24.1% in low mode
        MaskConfig(mode="random", tau=1.5),
    ],
)
def test_masking_curve_marker_text_is_the_card_text(config):
    scores, index = _near_one_index()
    result = compute_masks(index, config)
    card = fmt.share(result.stats().pooled_share)
    fig = masking_curve_figure(
        {None: index, "ground_truth": index},
        config.mode,
        [result.tau],
        colors={"A": "#000000", "B": "#111111"},
    )
    assert masked_share_marker_text(fig) == [card]
    assert [t.name for t in fig.data if t.meta.get("role") == "tau"] == [
        f"τ = {fmt.tau(result.tau)}"
    ]


def test_masked_share_histogram_names_the_pooled_share_in_the_legend():
    _, index = _near_one_index()
    stats = compute_masks(index, MaskConfig(tau=2.5)).stats()
    fig = masked_share_histogram([("A", stats)], {"A": "#D55E00"})
    (entry,) = [t for t in fig.data if t not in data_traces(fig)]
    assert entry.name == f"pooled {fmt.share(stats.pooled_share)}"
    assert not fig.layout.annotations
    assert fig.layout.yaxis.dtick == 1  # a count of examples: whole-number ticks
