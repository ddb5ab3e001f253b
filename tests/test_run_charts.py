"""The Runs page's charts, the runs table and the frontier, checked the way a reader would: the
bands are the paired 95% intervals computed directly from the stored per-item results, the target
is the honest metric, and missing data says why instead of drawing NaN."""

from __future__ import annotations

import json
import math

import pytest

from core.eval.scorers import SuiteResult, item_scores
from core.jobs.runfiles import eval_round_path
from core.stats import paired_interval
from core.study.runs import load_run, run_findings, runs_display_table, runs_table
from core.viz.run_charts import (
    METHOD_COLORS,
    bwt_chart,
    figure_notes,
    frontier_chart,
    metric_chart,
    metric_options,
    target_delta_chart,
    task_delta_chart,
    task_delta_charts,
    top_row_charts,
)
from tests.eval_runs import BASE, later, make_eval_run


def traces(fig, role: str, run: str | None = None) -> list:
    return [
        t
        for t in fig.data
        if t.meta and t.meta.get("role") == role and (run is None or t.meta.get("run") == run)
    ]


def band_bounds(band) -> tuple[list[float], list[float], list[float]]:
    """(steps, low, high) of a band trace (drawn as high forwards, then low backwards)."""
    n = len(band.x) // 2
    return list(band.x[:n]), list(band.y[n:][::-1]), list(band.y[:n])


def stored_items(run_dir, step: int, task: str, metric: str) -> list[tuple[float, float]]:
    data = json.loads(eval_round_path(run_dir, step).read_text())
    scores = item_scores(SuiteResult.from_dict(data).task(task), metric)
    return list(scores.values())


@pytest.fixture
def two_runs(tmp_path):
    stm = make_eval_run(tmp_path, "stm1", {0: BASE, 2: later(2), 4: later(4)}, method="stm")
    gt = make_eval_run(tmp_path, "gt1", {0: BASE, 2: later(1), 4: later(3)}, method="gt")
    return [load_run(stm), load_run(gt)]


def test_target_band_is_the_paired_interval_of_the_stored_items(two_runs):
    fig = target_delta_chart(two_runs)
    assert fig.layout.title.text == "Target Δ vs step 0"
    # no target accuracy in this suite: the full-token NLL, never the easy-token one
    assert "mbpp_ppl nll" in fig.layout.yaxis.title.text.replace(
        "<br>", " "
    ) and "lower is better" in (fig.layout.yaxis.title.text.replace("<br>", " "))
    for run in two_runs:
        [line], [band] = traces(fig, "line", run.run_id), traces(fig, "band", run.run_id)
        assert line.line.color == METHOD_COLORS[run.method]
        steps, low, high = band_bounds(band)
        assert steps == list(line.x) == [0, 2, 4]
        base = stored_items(run.run_dir, 0, "mbpp_ppl", "nll")
        for k, step in enumerate(steps):
            direct = paired_interval(base, stored_items(run.run_dir, step, "mbpp_ppl", "nll"))
            assert line.y[k] == pytest.approx(direct.estimate)
            assert (low[k], high[k]) == pytest.approx((direct.low, direct.high))
    # the zero line, and the notes read the verdict off the interval
    assert any(s.y0 == s.y1 == 0 for s in fig.layout.shapes)
    notes = figure_notes(fig)
    assert any(n.startswith("stm τ=2.5 · stm1, step 4:") and n.endswith("nats: better.")
               for n in notes)  # fmt: skip


def test_a_target_accuracy_task_is_the_target_in_points(tmp_path):
    tasks = {"mbpp": ("code_exec", "target"), "mbpp_ppl": ("ref_ppl", "target"),
             "arc_easy": ("mc_loglik", "ood")}  # fmt: skip
    passed = [i % 2 == 0 for i in range(20)]
    rounds = {
        0: {"mbpp": passed, "mbpp_ppl": BASE["mbpp_ppl"], "arc_easy": BASE["arc_easy"]},
        3: {"mbpp": [True] * 20, "mbpp_ppl": later(3)["mbpp_ppl"], "arc_easy": BASE["arc_easy"]},
    }
    run = load_run(make_eval_run(tmp_path, "acc", rounds, tasks=tasks))
    assert run.target_task() == ("mbpp", "pass@1")
    fig = target_delta_chart([run])
    assert "mbpp pass@1, points (higher is better)" in fig.layout.yaxis.title.text.replace(
        "<br>", " "
    )
    [line] = traces(fig, "line")
    direct = paired_interval(
        stored_items(run.run_dir, 0, "mbpp", "pass@1"),
        stored_items(run.run_dir, 3, "mbpp", "pass@1"),
        scale=100,
    )
    assert list(line.y) == pytest.approx([0.0, 50.0]) and direct.estimate == pytest.approx(50.0)
    _, low, high = band_bounds(traces(fig, "band")[0])
    assert (low[1], high[1]) == pytest.approx((direct.low, direct.high))
    table = runs_table([run]).iloc[0]
    assert table["target"] == "mbpp pass@1" and table["target Δ unit"] == "points"
    assert (table["target Δ low"], table["target Δ high"]) == pytest.approx(
        (direct.low, direct.high)
    )


def test_bwt_chart_band_is_the_recorded_interval(two_runs):
    fig = bwt_chart(two_runs)
    for run in two_runs:
        frame = run.summary_frame()
        [line], [band] = traces(fig, "line", run.run_id), traces(fig, "band", run.run_id)
        assert list(line.y) == pytest.approx(list(frame["bwt"]))
        steps, low, high = band_bounds(band)
        assert low == pytest.approx(list(frame["bwt_low"]))
        assert high == pytest.approx(list(frame["bwt_high"]))
    assert any("%: worse." in n for n in figure_notes(fig))  # stm loses ARC-Easy items


def test_top_row_is_target_bwt_and_loss_with_labelled_axes(two_runs):
    charts = dict(top_row_charts(two_runs))
    assert list(charts) == ["target", "bwt", "loss"]
    loss = charts["loss"]
    assert loss.layout.yaxis.title.text.replace("<br>", " ") == "loss on trained (unmasked) tokens"
    assert [list(t.y) for t in traces(loss, "line")] == [[2.0, 1.8, 1.7, 1.6]] * 2
    for fig in charts.values():
        assert fig.layout.title.text and fig.layout.xaxis.title.text == "step"
        # the legend sits below the plot, in a margin as tall as its rows: it never covers
        # the title or the data
        legend = fig.layout.legend
        assert (legend.yref, legend.yanchor, legend.y) == ("container", "bottom", 0)
        assert fig.layout.margin.b >= 64 + 22 * sum(t.showlegend is not False for t in fig.data)
        fig.to_json()
    # two runs of different methods: two colours; two seeds of one method: one colour, two dashes
    seeds = [two_runs[0], load_run(make_eval_run(two_runs[0].run_dir.parent, "stm2",
                                                 {0: BASE, 2: later(1)}, seed=1))]  # fmt: skip
    styles = [t.line for t in traces(target_delta_chart(seeds), "line")]
    assert styles[0].color == styles[1].color and styles[0].dash != styles[1].dash


def test_per_task_charts_show_chance_and_mark_tasks_at_chance(tmp_path):
    at_chance = [i % 4 == 0 for i in range(24)]  # 6/24 right: exactly chance (4 choices)
    base = {**BASE, "arc_easy": at_chance}
    run = load_run(make_eval_run(tmp_path, "r", {0: base, 2: {**later(2), "arc_easy": at_chance}}))
    keys = [k for k, _ in task_delta_charts([run])]
    assert keys == ["task-mbpp_ppl", "task-arc_easy", "task-gsm8k_ppl"]  # target first
    fig = task_delta_chart([run], "arc_easy")
    assert fig.layout.title.text == "arc_easy acc Δ (OOD) · at chance"
    assert figure_notes(fig)[0].startswith("At chance:")
    [chance] = [s for s in fig.layout.shapes if s.line.dash == "dot"]
    assert chance.y0 == pytest.approx(100 * (0.25 - 0.25))
    # above chance: the chance line sits where the score would reach chance, no mark
    fine = load_run(make_eval_run(tmp_path, "f", {0: BASE, 2: later(2)}))
    fig = task_delta_chart([fine], "arc_easy")
    assert "at chance" not in fig.layout.title.text
    [chance] = [s for s in fig.layout.shapes if s.line.dash == "dot"]
    assert chance.y0 == pytest.approx(100 * (0.25 - 0.75))
    assert "points (higher is better)" in fig.layout.yaxis.title.text.replace("<br>", " ")


def test_no_rounds_one_round_and_too_few_items_say_so(tmp_path):
    empty = load_run(make_eval_run(tmp_path, "none", {}))
    single = load_run(make_eval_run(tmp_path, "single", {0: BASE}))
    one_item = {t: v[:1] for t, v in BASE.items()}
    tiny = load_run(make_eval_run(tmp_path, "tiny", {0: one_item, 1: {t: v[:1] for t, v in
                                                                      later(1).items()}}))  # fmt: skip
    runs = [empty, single, tiny]
    for fig in [f for _, f in top_row_charts(runs)] + [f for _, f in task_delta_charts(runs)]:
        text = " ".join(figure_notes(fig))
        assert "nan" not in text.lower()
        fig.to_json()
    notes = " ".join(figure_notes(target_delta_chart(runs)))
    assert "stm τ=2.5 · none: no evaluation rounds yet." in notes
    assert "single: only step 0 evaluated so far; a change needs a later round." in notes
    assert "1 item: too few for an interval" in notes
    fig = target_delta_chart([tiny])
    assert len(traces(fig, "line")) == 1 and not traces(fig, "band")
    # nothing to draw at all: the chart says it in the middle
    fig = target_delta_chart([empty])
    assert not traces(fig, "line") and fig.layout.annotations[0].text == "No evaluation rounds yet."
    assert run_findings(single) == [
        "stm τ=2.5 · single: only step 0 evaluated so far; a change needs a later round."
    ]
    table = runs_display_table(runs_table(runs)).set_index("run")
    assert table.loc["none", "target Δ"] == table.loc["single", "target Δ"] == "–"
    assert table.loc["single", "BWT %"] == table.loc["single", "TI %"] == "–"  # step 0 vs itself
    assert table.loc["tiny", "target Δ"].endswith("nats (no interval)")


def test_the_picker_draws_exactly_the_chosen_metric(two_runs):
    options = metric_options(two_runs)
    assert options[0] == ("mbpp_ppl", "nll", "target")
    assert ("gsm8k_ppl", "nll_easy", "ood") in options and (
        "arc_easy",
        "acc_norm",
        "ood",
    ) in options
    fig = metric_chart(two_runs, "gsm8k_ppl", "ppl")
    assert fig.layout.title.text == "gsm8k_ppl ppl"
    for run, line in zip(two_runs, traces(fig, "line"), strict=True):
        frame = run.eval_frame()
        want = frame[(frame["task"] == "gsm8k_ppl") & (frame["metric"] == "ppl")]
        assert list(line.y) == pytest.approx(list(want["value"]))


def test_runs_table_carries_each_change_with_its_interval(two_runs):
    table = runs_table(two_runs).set_index("run")
    summary = two_runs[0].final_summary
    row = table.loc["stm1"]
    assert (row["BWT"], row["BWT low"], row["BWT high"]) == pytest.approx(
        (summary.bwt, summary.bwt_low, summary.bwt_high)
    )
    assert (row["TI"], row["TI low"], row["TI high"]) == pytest.approx(
        (summary.ti, summary.ti_low, summary.ti_high)
    )
    shown = runs_display_table(runs_table(two_runs)).set_index("run").loc["stm1"]
    assert (
        shown["BWT %"] == f"{summary.bwt:+.1f} [{summary.bwt_low:+.1f}, {summary.bwt_high:+.1f}]%"
    )
    assert shown["target Δ"].endswith(" nats") and "[" in shown["target Δ"]
    findings = run_findings(two_runs[0])
    assert findings[0].startswith("stm τ=2.5 · stm1: target mbpp_ppl nll at step 4 vs step 0:")
    assert any(f.startswith("stm τ=2.5 · stm1: BWT at step 4:") for f in findings)


def test_frontier_has_error_bars_and_a_single_run_state(two_runs):
    table = runs_table(two_runs[:1])
    fig = frontier_chart(table)
    [point] = traces(fig, "line")
    row = table.iloc[0]
    assert list(point.x) == pytest.approx([row["BWT"]]) and list(point.y) == pytest.approx(
        [row["TI"]]
    )
    assert point.error_x.array[0] == pytest.approx(row["BWT high"] - row["BWT"])
    assert point.error_x.arrayminus[0] == pytest.approx(row["BWT"] - row["BWT low"])
    assert point.error_y.array[0] == pytest.approx(row["TI high"] - row["TI"])
    assert point.error_y.arrayminus[0] == pytest.approx(row["TI"] - row["TI low"])
    assert "A comparison needs a second run." in figure_notes(fig)[0]
    both = frontier_chart(runs_table(two_runs))
    assert sum(len(t.x) for t in traces(both, "line")) == 2
    assert not any("second run" in n for n in figure_notes(both))


def test_frontier_says_why_a_run_is_not_drawn(tmp_path):
    at_chance = [i % 4 == 0 for i in range(24)]
    run = load_run(make_eval_run(tmp_path, "r", {0: {**BASE, "arc_easy": at_chance},
                                                 2: {**later(2), "arc_easy": at_chance}}))  # fmt: skip
    fig = frontier_chart(runs_table([run]))
    assert not traces(fig, "line")
    assert fig.layout.annotations[0].text == "No run has both TI and BWT yet."
    [note] = figure_notes(fig)
    assert note.startswith("stm τ=2.5 · r: not drawn, no BWT (BWT undefined")


def test_runs_without_saved_rounds_fall_back_to_records_without_intervals(tmp_path):
    from tests.test_report import _make_run

    _make_run(tmp_path, "old", "gt", None, None,
              {0: {"mbpp": ("pass@1", 0.20, "target")}, 4: {"mbpp": ("pass@1", 0.25, "target")}},
              {0: (0.0, 0.0), 4: (-50.0, 25.0)})  # fmt: skip
    run = load_run(tmp_path / "old")
    fig = target_delta_chart([run])
    [line] = traces(fig, "line")
    assert list(line.y) == pytest.approx([0.0, 5.0]) and not traces(fig, "band")
    assert "no per-item results saved" in " ".join(figure_notes(fig))
    assert math.isclose(runs_table([run]).iloc[0]["target Δ"], 5.0)


def test_rounds_saved_before_the_honest_metric_still_chart_the_full_token_nll(tmp_path):
    folder = make_eval_run(tmp_path, "old", {0: BASE, 2: later(2)})
    for step in (0, 2):  # such rounds named the easy-token NLL their reference tasks' score
        path = eval_round_path(folder, step)
        data = json.loads(path.read_text())
        for task in data["tasks"]:
            if task["scorer"] == "ref_ppl":
                task["primary"] = "nll_easy"
        path.write_text(json.dumps(data))
    run = load_run(folder)
    assert run.target_task() == ("mbpp_ppl", "nll")
    assert set(run.changes()["metric"]) == {"nll", "acc"}
