"""Chart builders: traces per source, log axes, tau marks and plotted data equal to the inputs."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from core.data.records import ScoredExample
from core.scoring.analytics import category_shares, share_vs_tau, token_ppl_frame
from core.viz.charts import (
    FALLBACK_COLORS,
    PLOTLY_CONFIG,
    SOURCE_COLORS,
    category_share_chart,
    plotly_config,
    ppl_cdf,
    ppl_histogram,
    seq_ppl_box,
    share_vs_tau_chart,
    source_color,
    source_label,
    spike_plot,
)


def make_example(ex_id: str, ppl: list[float], source: str = "ground_truth") -> ScoredExample:
    n = len(ppl)
    tokens = [f" t{i}" for i in range(n)]
    return ScoredExample(
        id=ex_id,
        prompt="p",
        response="".join(tokens),
        convention="prompt",
        token_ids=list(range(n + 1)),
        tokens=["<|user|>"] + tokens,
        response_start=1,
        logprob=[-math.log(p) for p in ppl],
        rank=[1] * n,
        top_ids=[[] for _ in range(n)],
        top_tokens=[[] for _ in range(n)],
        top_logprobs=[[] for _ in range(n)],
        source=source,
    )


GROUPS = {
    "ground_truth": [make_example("g1", [1.0, 30.0, 2.0, 400.0]), make_example("g2", [5.0, 1.1])],
    "self_output": [make_example("s1", [1.0, 1.2, 1.05]), make_example("s2", [1.3])],
    "rephrase": [make_example("r1", [1.5, 2.0, 6.0])],
}


def tau_shapes(fig: go.Figure) -> list:
    return [s for s in fig.layout.shapes if s.name == "tau"]


def assert_titled(fig: go.Figure) -> None:
    assert fig.layout.title.text
    assert fig.layout.xaxis.title.text and fig.layout.yaxis.title.text
    fig.to_json()  # valid, serialisable figure


def test_spike_plot_traces_data_and_tau_line():
    examples = {"ground_truth": GROUPS["ground_truth"][0], "self_output": GROUPS["self_output"][0]}
    fig = spike_plot(examples, tau=2.5)
    assert [t.name for t in fig.data] == ["Ground truth", "Self-Output"]
    for trace, (source, ex) in zip(fig.data, examples.items(), strict=True):
        assert trace.meta["source"] == source
        assert list(trace.x) == list(range(ex.n_response))
        np.testing.assert_allclose(trace.y, ex.ppl)
        assert trace.line.color == SOURCE_COLORS[source]
    assert fig.layout.yaxis.type == "log"
    (line,) = tau_shapes(fig)
    assert line.y0 == line.y1 == 2.5
    # plotly.js places annotations on log axes by log10 of the value
    assert any(a.y == pytest.approx(math.log10(2.5)) for a in fig.layout.annotations)
    assert_titled(fig)
    assert tau_shapes(spike_plot(examples)) == []


def test_ppl_histogram_per_source_log_bins_and_tau():
    frame = token_ppl_frame(GROUPS)
    fig = ppl_histogram(frame, tau=2.5, bins=10)
    assert [t.meta["source"] for t in fig.data] == ["ground_truth", "self_output", "rephrase"]
    assert fig.layout.xaxis.type == "log"
    for trace in fig.data:
        part = frame[frame["source"] == trace.meta["source"]]
        assert sum(trace.meta["counts"]) == len(part)
        assert sum(trace.y[:-1]) == pytest.approx(1.0)  # share of the source's tokens
        edges = np.asarray(trace.x)
        assert len(edges) == 11 and np.all(
            np.diff(np.log(edges)) == pytest.approx(np.log(edges[1] / edges[0]))
        )
    (line,) = tau_shapes(fig)
    assert line.x0 == 2.5
    assert_titled(fig)
    counts = ppl_histogram(frame, log_x=False, normalize=False, bins=5)
    assert counts.layout.xaxis.type != "log"
    assert sum(counts.data[0].y[:-1]) == len(frame[frame["source"] == "ground_truth"])


def test_ppl_cdf_is_the_empirical_cdf():
    frame = token_ppl_frame(GROUPS)
    fig = ppl_cdf(frame, tau=2.5)
    assert len(fig.data) == 3
    for trace in fig.data:
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
    lines = [t for t in fig.data if not (t.meta or {}).get("current_tau")]
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
    assert_titled(fig)


def test_category_share_chart_grouped_all_vs_high():
    df = category_shares(GROUPS, tau=2.5)
    fig = category_share_chart(df)
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
    for trace, (source, examples) in zip(fig.data, GROUPS.items(), strict=True):
        assert trace.name == source_label(source)
        np.testing.assert_allclose(trace.y, [ex.seq_ppl for ex in examples])
    assert fig.layout.yaxis.type == "log"
    assert_titled(fig)


def test_colours_consistent_across_charts():
    frame = token_ppl_frame(GROUPS)
    hist = ppl_histogram(frame)
    cdf = ppl_cdf(frame)
    for a, b in zip(hist.data, cdf.data, strict=True):
        assert a.line.color == b.line.color == source_color(a.meta["source"])
    assert set(SOURCE_COLORS) >= {"ground_truth", "self_output", "rephrase", "generated"}
    assert len(set(SOURCE_COLORS.values())) == len(SOURCE_COLORS)
    assert source_color("my scorer") == source_color("my scorer") in FALLBACK_COLORS


def test_plotly_config_exports_png():
    assert PLOTLY_CONFIG["toImageButtonOptions"]["format"] == "png"
    config = plotly_config("spike_plot")
    assert config["toImageButtonOptions"] == {"format": "png", "filename": "spike_plot", "scale": 2}
    assert PLOTLY_CONFIG["toImageButtonOptions"]["filename"] == "perplexity_lens"  # not mutated
