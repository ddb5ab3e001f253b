"""The Runs page's charts, the runs table and the frontier, checked the way a reader would: the
bands are the paired 95% intervals computed directly from the stored per-item results, the target
is the honest metric, and missing data says why instead of drawing NaN."""

from __future__ import annotations

import json
import math

import pytest

from core import fmt
from core.eval.drift import DRIFT_LABELS
from core.eval.scorers import SuiteResult, item_scores
from core.jobs.runfiles import eval_round_path
from core.stats import paired_interval
from core.study.runs import (
    drift_display_table,
    drift_missing,
    drift_notes,
    drift_table,
    load_run,
    run_findings,
    runs_display_table,
    runs_table,
)
from core.viz.run_charts import (
    METHOD_COLORS,
    bwt_chart,
    drift_chart,
    drift_charts,
    drift_frontier_chart,
    figure_notes,
    frontier_chart,
    loss_chart,
    metric_chart,
    metric_label,
    metric_options,
    no_loss_reason,
    target_delta_chart,
    task_delta_chart,
    task_delta_charts,
    top_row_charts,
    value_text,
)
from tests.eval_runs import BASE, BASE_DRIFT, DRIFT_TASKS, later, later_drift, make_eval_run
from tests.factories import make_run


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
    assert "mbpp_ppl NLL per token" in fig.layout.yaxis.title.text.replace(
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
    assert any(
        n.startswith("stm τ=2.5 · stm1, step 4:") and n.endswith("nats: better.") for n in notes
    )


def test_a_target_accuracy_task_is_the_target_in_points(tmp_path):
    tasks = {
        "mbpp": ("code_exec", "target"),
        "mbpp_ppl": ("ref_ppl", "target"),
        "arc_easy": ("mc_loglik", "ood"),
    }
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
    seeds = [
        two_runs[0],
        load_run(make_eval_run(two_runs[0].run_dir.parent, "stm2", {0: BASE, 2: later(1)}, seed=1)),
    ]
    styles = [t.line for t in traces(target_delta_chart(seeds), "line")]
    assert styles[0].color == styles[1].color and styles[0].dash != styles[1].dash


def test_per_task_charts_show_chance_and_mark_tasks_at_chance(tmp_path):
    at_chance = [i % 4 == 0 for i in range(24)]  # 6/24 right: exactly chance (4 choices)
    base = {**BASE, "arc_easy": at_chance}
    run = load_run(make_eval_run(tmp_path, "r", {0: base, 2: {**later(2), "arc_easy": at_chance}}))
    keys = [k for k, _ in task_delta_charts([run])]
    assert keys == ["task-mbpp_ppl", "task-arc_easy", "task-gsm8k_ppl"]  # target first
    fig = task_delta_chart([run], "arc_easy")
    assert fig.layout.title.text == "arc_easy accuracy Δ (OOD) · at chance"
    assert figure_notes(fig)[0].startswith("At chance:")
    [chance] = [s for s in fig.layout.shapes if s.line.dash == "dot"]
    assert chance.y0 == pytest.approx(100 * (0.25 - 0.25))
    # above chance: the chance line sits where the score would reach chance, no mark
    fine = load_run(make_eval_run(tmp_path, "f", {0: BASE, 2: later(2)}))
    fig = task_delta_chart([fine], "arc_easy")
    assert "at chance" not in fig.layout.title.text
    [chance] = [s for s in fig.layout.shapes if s.line.dash == "dot"]
    assert chance.y0 == pytest.approx(100 * (0.25 - 0.75))
    # the chance line is named in the legend, not by a label over the lines
    assert not fig.layout.annotations
    assert [t.name for t in traces(fig, "chance")] == ["chance (Δ -50.0 points)"]
    assert "points (higher is better)" in fig.layout.yaxis.title.text.replace("<br>", " ")


def test_no_rounds_one_round_and_too_few_items_say_so(tmp_path):
    empty = load_run(make_eval_run(tmp_path, "none", {}))
    single = load_run(make_eval_run(tmp_path, "single", {0: BASE}))
    one_item = {t: v[:1] for t, v in BASE.items()}
    tiny = load_run(
        make_eval_run(tmp_path, "tiny", {0: one_item, 1: {t: v[:1] for t, v in later(1).items()}})
    )
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
    # a longer message is cut into lines that fit a panel a third of a 1280 px page wide
    fig = bwt_chart([empty])
    lines = fig.layout.annotations[0].text.split("<br>")
    assert " ".join(lines) == "No BWT to draw (see the note below)." and len(lines) == 2
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
    assert fig.layout.title.text == "gsm8k_ppl perplexity"
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
    run = load_run(
        make_eval_run(
            tmp_path,
            "r",
            {0: {**BASE, "arc_easy": at_chance}, 2: {**later(2), "arc_easy": at_chance}},
        )
    )
    fig = frontier_chart(runs_table([run]))
    assert not traces(fig, "line")
    assert fig.layout.annotations[0].text == "No run has both TI and BWT yet."
    [note] = figure_notes(fig)
    assert note.startswith("stm τ=2.5 · r: not drawn, no BWT (BWT undefined")


def test_runs_without_saved_rounds_fall_back_to_records_without_intervals(tmp_path):

    make_run(
        tmp_path,
        "old",
        "gt",
        None,
        None,
        {0: {"mbpp": ("pass@1", 0.20, "target")}, 4: {"mbpp": ("pass@1", 0.25, "target")}},
        {0: (0.0, 0.0), 4: (-50.0, 25.0)},
    )
    run = load_run(tmp_path / "old")
    fig = target_delta_chart([run])
    [line] = traces(fig, "line")
    assert list(line.y) == pytest.approx([0.0, 5.0]) and not traces(fig, "band")
    assert "no per-item results saved" in " ".join(figure_notes(fig))
    assert math.isclose(runs_table([run]).iloc[0]["target Δ"], 5.0)


# ----------------------------------------------------------------------- drift from the base


@pytest.fixture
def drift_runs(tmp_path):
    """Three rounds of stm, two of gt (a single round after step 0) and an old run whose rounds
    predate drift."""
    stm = make_eval_run(
        tmp_path, "stm1", {0: BASE_DRIFT, 2: later_drift(2), 4: later_drift(4)}, tasks=DRIFT_TASKS
    )
    gt = make_eval_run(
        tmp_path, "gt1", {0: BASE_DRIFT, 3: later_drift(3)}, method="gt", tasks=DRIFT_TASKS
    )
    old = make_eval_run(tmp_path, "old1", {0: BASE, 2: later(2)}, method="random")
    return [load_run(stm), load_run(gt), load_run(old)]


def test_changes_give_drift_rows_with_the_paired_interval_of_the_stored_items(drift_runs):
    stm = drift_runs[0]
    frame = stm.changes()
    rows = frame[frame["task"] == "ood_drift"].sort_values("step")
    assert set(rows["metric"]) == {"kl"} and set(rows["unit"]) == {"nats"}
    assert not rows["accuracy"].any() and not rows["is_ti"].any()
    assert stm.target_task() == ("mbpp_ppl", "nll")  # drift never becomes the target metric
    base = stored_items(stm.run_dir, 0, "ood_drift", "kl")
    for r in rows.itertuples():
        value = SuiteResult.from_dict(json.loads(eval_round_path(stm.run_dir, r.step).read_text()))
        assert r.delta == pytest.approx(value.task("ood_drift").metrics["kl"])  # KL is 0 at step 0
        direct = paired_interval(base, stored_items(stm.run_dir, r.step, "ood_drift", "kl"))
        assert (r.low, r.high) == pytest.approx((direct.low, direct.high))


def test_drift_charts_draw_each_runs_kl_with_its_band_from_zero(drift_runs):
    charts = dict(drift_charts(drift_runs))
    assert list(charts) == ["ood-drift", "target-drift"]
    fig = charts["ood-drift"]
    assert fig.layout.title.text == "OOD drift: KL from the base model"
    assert charts["target-drift"].layout.title.text == "Target drift: KL from the base model"
    assert fig.layout.yaxis.title.text == "token KL from base, nats"
    assert fig.layout.xaxis.title.text == "step" and fig.layout.xaxis.dtick == 1  # whole steps
    stm, gt, old = drift_runs
    [line], [band] = traces(fig, "line", "stm1"), traces(fig, "band", "stm1")
    steps, low, high = band_bounds(band)
    assert steps == list(line.x) == [0, 2, 4] and line.y[0] == 0.0
    base = stored_items(stm.run_dir, 0, "ood_drift", "kl")
    for k, step in enumerate(steps):
        direct = paired_interval(base, stored_items(stm.run_dir, step, "ood_drift", "kl"))
        assert line.y[k] == pytest.approx(direct.estimate)
        assert (low[k], high[k]) == pytest.approx((direct.low, direct.high))
    # a KL is never negative: the axis starts at 0 and holds every band
    y0, y1 = fig.layout.yaxis.range
    assert y0 == 0 and y1 >= max(high) and min(low) >= 0
    # gt has one round after step 0: an interval bar on that point, not a band
    [gt_line] = traces(fig, "line", "gt1")
    assert not traces(fig, "band", "gt1") and list(gt_line.x) == [0, 3]
    [row] = gt.changes().query("task == 'ood_drift' and step == 3").itertuples()
    assert list(gt_line.error_y.array) == pytest.approx([0.0, row.high - row.delta])
    assert list(gt_line.error_y.arrayminus) == pytest.approx([0.0, row.delta - row.low])
    # the old run is left out and the notes say why; each drawn run's last KL, readable
    notes = figure_notes(fig)
    assert any(
        n.startswith("stm τ=2.5 · stm1, step 4: KL 0.100 [") and n.endswith("] nats.")
        for n in notes
    )
    assert any(
        "old1: no OOD drift measured (its rounds were evaluated before drift" in n for n in notes
    )
    assert not traces(fig, "line", "old1")
    assert "nan" not in " ".join(notes).lower()
    fig.to_json()


def test_drift_chart_states_without_a_later_round(tmp_path):
    only_base = load_run(make_eval_run(tmp_path, "z", {0: BASE_DRIFT}, tasks=DRIFT_TASKS))
    fig = drift_chart([only_base], "ood_drift")
    assert not traces(fig, "line")
    assert fig.layout.annotations[0].text == "No OOD drift to show yet."
    [note] = figure_notes(fig)
    assert "only step 0 evaluated so far (the base model: no drift by definition)" in note


def test_per_task_charts_draw_drift_probes_as_drift_and_skip_what_is_drawn_above(drift_runs):
    charts = dict(task_delta_charts(drift_runs))
    assert charts["task-target_drift"].layout.title.text == "Target drift: KL from the base model"
    assert charts["task-ood_drift"].layout.yaxis.title.text == "token KL from base, nats"
    skipped = [k for k, _ in task_delta_charts(drift_runs, skip=("ood_drift", "target_drift"))]
    assert skipped == ["task-mbpp_ppl", "task-arc_easy", "task-gsm8k_ppl"]


def test_drift_table_gives_the_latest_round_with_intervals_and_readable_names(drift_runs):
    table = drift_table(drift_runs)
    assert set(table["run"]) == {"stm1", "gt1"}  # the old run has no drift round
    stm = table[table["run"] == "stm1"]
    assert set(stm["step"]) == {4} and list(dict.fromkeys(stm["task"])) == [
        "target_drift",
        "ood_drift",
    ]
    data = json.loads(eval_round_path(drift_runs[0].run_dir, 4).read_text())
    ood = SuiteResult.from_dict(data).task("ood_drift")
    for metric in ("kl", "top1_agree", "dnll", "kl_toward", "kl_away"):
        [row] = stm[(stm["task"] == "ood_drift") & (stm["metric"] == metric)].itertuples()
        assert row.value == pytest.approx(ood.metrics[metric])
        items = list(item_scores(ood, metric).values())
        direct = paired_interval([(0.0, d) for _, d in items], items)
        assert (row.low, row.high) == pytest.approx((direct.low, direct.high))
        assert row.low <= row.value <= row.high
    shown = drift_display_table(table)
    assert list(shown.columns) == [
        "run",
        "probe",
        "step",
        DRIFT_LABELS["kl"],
        DRIFT_LABELS["top1_agree"],
        DRIFT_LABELS["dnll"],
        "KL toward / away from the base's answer, nats",
    ]
    row = shown[(shown["run"] == "stm τ=2.5 · stm1") & shown["probe"].str.startswith("OOD")]
    [row] = row.to_dict("records")
    assert row["probe"] == "OOD drift (mixed out-of-domain prompts)"
    assert row[DRIFT_LABELS["kl"]].startswith("0.100 [")
    assert row[DRIFT_LABELS["top1_agree"]].startswith("86.7% [")
    assert row[DRIFT_LABELS["dnll"]].startswith("+0.020 [")  # moved away from the base's answers
    assert row["KL toward / away from the base's answer, nats"] == "0.020 / 0.080 (20% toward)"
    target = shown[(shown["run"] == "stm τ=2.5 · stm1") & shown["probe"].str.startswith("Target")]
    assert target.iloc[0][DRIFT_LABELS["dnll"]].startswith("-0.060 [")  # sharpening
    assert "80% toward" in target.iloc[0]["KL toward / away from the base's answer, nats"]
    assert drift_notes(drift_runs) == [
        "random τ=2.5 · old1: no drift probes in its rounds: evaluated before drift was measured."
    ]
    assert drift_display_table(drift_table(drift_runs[2:])).empty


def test_drift_frontier_has_error_bars_both_ways_and_leaves_old_runs_out(drift_runs):
    table, drift = runs_table(drift_runs), drift_table(drift_runs)
    fig = drift_frontier_chart(table, drift, drift_missing(drift_runs))
    assert fig.layout.title.text == "Target gain vs OOD drift"
    assert fig.layout.yaxis.title.text.startswith("OOD drift: token KL from base, nats")
    assert "nats (left is better)" in fig.layout.xaxis.title.text  # the target is an NLL here
    points = traces(fig, "line")
    assert sorted(r for t in points for r in t.meta["runs"]) == ["gt1", "stm1"]
    for trace in points:
        run = trace.meta["runs"][0]
        facts = table.set_index("run").loc[run]
        kl = drift[
            (drift["run"] == run) & (drift["task"] == "ood_drift") & (drift["metric"] == "kl")
        ].iloc[0]
        assert list(trace.x) == pytest.approx([facts["target Δ"]])
        assert list(trace.y) == pytest.approx([kl["value"]])
        assert trace.error_x.array[0] == pytest.approx(facts["target Δ high"] - facts["target Δ"])
        assert trace.error_x.arrayminus[0] == pytest.approx(
            facts["target Δ"] - facts["target Δ low"]
        )
        assert trace.error_y.array[0] == pytest.approx(kl["high"] - kl["value"])
        assert trace.error_y.arrayminus[0] == pytest.approx(kl["value"] - kl["low"])
        assert list(trace.text) == [facts["label"]] and trace.mode == "markers+text"
        # the label sits off both error bars (a centred one covered the vertical bar)
        assert "center" not in trace.textposition and "middle" not in trace.textposition
    assert fig.layout.yaxis.range[0] == 0
    ood_kl = drift[(drift["task"] == "ood_drift") & (drift["metric"] == "kl")]
    assert fig.layout.yaxis.range[1] >= max(ood_kl["high"])
    notes = figure_notes(fig)
    assert notes == [
        "Not drawn, no drift probes in its rounds: evaluated before drift was "
        "measured: random τ=2.5 · old1."
    ]
    one = drift_frontier_chart(runs_table(drift_runs[:1]), drift_table(drift_runs[:1]))
    assert "A comparison needs a second run." in figure_notes(one)[0]
    none = drift_frontier_chart(runs_table(drift_runs[2:]), drift_table(drift_runs[2:]))
    assert not traces(none, "line")
    assert none.layout.annotations[0].text == "No run has both a target change and OOD drift yet."
    fig.to_json()


def test_readable_drift_names_and_loss_reasons(drift_runs, tmp_path):
    assert metric_label("ood_drift", "top1_agree") == "OOD drift: top-1 agreement with the base"
    assert metric_label("mbpp_ppl", "nll", sep=" · ") == "mbpp_ppl · NLL per token"
    options = metric_options(drift_runs)
    assert ("ood_drift", "kl", "ood") in options
    assert ("ood_drift", "dbpb", "ood") not in options  # never defined on prompt probes
    fig = metric_chart(drift_runs, "ood_drift", "kl")
    assert fig.layout.title.text == "OOD drift: token KL(base ‖ tuned), nats"
    # only an evaluation job's run is "evaluation-only"; a training run says where it is
    stm = drift_runs[0]
    assert "running: no training step logged yet" in no_loss_reason(stm, "running")
    assert "failed before" in no_loss_reason(stm, "failed")
    assert "cancelled before" in no_loss_reason(stm, "cancelled")
    assert "evaluation-only" not in " ".join(
        no_loss_reason(stm, s) for s in ("queued", "running", "failed", "cancelled", None)
    )
    folder = make_eval_run(tmp_path / "e", "ev", {0: BASE}, losses=())
    (folder / "config.json").write_text(json.dumps({"kind": "eval", "model": "default"}))
    assert no_loss_reason(load_run(folder)) == "an evaluation-only run (no training)"
    evaluation = load_run(folder)
    notes = figure_notes(loss_chart([evaluation]))
    assert notes == [f"{evaluation.label} · ev: an evaluation-only run (no training)."]
    notes = figure_notes(loss_chart([evaluation, stm], {"stm1": "failed"}))  # stm1 has a loss
    assert notes == [f"{evaluation.label} · ev: an evaluation-only run (no training)."]


def test_value_text():
    assert value_text(0.04213, 0.035, 0.0501, "nats") == "0.042 [0.035, 0.050] nats"
    assert value_text(0.9333, 0.91, 0.954, percent=True) == "93.3% [91.0, 95.4]"
    assert value_text(-0.02, -0.03, -0.01, signed=True) == "-0.020 [-0.030, -0.010]"
    assert value_text(0.1, None, None, "nats") == "0.100 nats (no interval)"
    assert value_text(float("nan")) == "–"


@pytest.mark.parametrize("fixture", ["two_runs", "drift_runs"])
def test_every_metric_in_the_picker_has_a_readable_name(fixture, request):
    """No internal key (nll_easy, easy_share, acc_norm, ...) reaches the picker or a title."""
    runs = request.getfixturevalue(fixture)
    for task, metric, _ in metric_options(runs):
        label = metric_label(task, metric, sep=" · ")
        assert "_" not in label.removeprefix(f"{task} · "), label
        assert metric_chart(runs, task, metric).layout.title.text == metric_label(task, metric)
    assert metric_label("gsm8k_ppl", "nll_easy") == (
        "gsm8k_ppl NLL on base-easy tokens (diagnostic)"
    )
    assert metric_label("gsm8k_ppl", "easy_share") == "gsm8k_ppl share of base-easy tokens"


def test_a_single_round_gets_whole_steps_a_0_1_accuracy_axis_and_chance(tmp_path):
    """One evaluation round (step 0): no step -1..1 axis and no accuracy -0.5..1.5 axis; the
    accuracy's chance level (ARC-Easy, 4 choices) is drawn and named."""
    run = load_run(make_eval_run(tmp_path, "one", {0: BASE}))
    fig = metric_chart([run], "arc_easy", "acc")
    assert fig.layout.xaxis.dtick == 1 and tuple(fig.layout.xaxis.range) == (-0.5, 0.5)
    assert tuple(fig.layout.yaxis.range) == (-0.02, 1.02)
    [chance] = traces(fig, "chance")
    assert chance.name == "chance (25.0%)"
    assert any(s.y0 == s.y1 == pytest.approx(0.25) for s in fig.layout.shapes)
    [line] = traces(fig, "line")
    assert f"step 0: {fmt.share(line.y[0])}" in line.customdata[0]
    # a perplexity is not a share: no 0-1 axis, no chance
    fig = metric_chart([run], "gsm8k_ppl", "ppl")
    assert fig.layout.yaxis.range is None and not traces(fig, "chance")


def test_a_single_accuracy_point_has_its_interval_bar(tmp_path):
    """A raw accuracy is a proportion of n items: every point, a single round's too, carries its
    95% (Wilson) interval as a bar, and the hover prints it with the app's number rule."""
    run = load_run(make_eval_run(tmp_path, "one", {0: BASE}))
    fig = metric_chart([run], "arc_easy", "acc")
    [line] = traces(fig, "line")
    frame = run.eval_frame()
    row = frame[(frame["task"] == "arc_easy") & (frame["metric"] == "acc")].iloc[0]
    p, n = float(row["value"]), int(row["n"])
    z = 1.959964
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert line.error_y.array[0] == pytest.approx(centre + half - p)
    assert line.error_y.arrayminus[0] == pytest.approx(p - (centre - half))
    assert line.error_y.arrayminus[0] > 0
    assert line.customdata[0].endswith(
        f"{fmt.share(p)} [{fmt.share(centre - half)}, {fmt.share(centre + half)}] of {n} items"
    )


def test_a_multiple_choice_target_shows_where_chance_lies(tmp_path):
    """ARC-Easy as the target (4 choices): the target's Δ chart has the chance line too."""
    tasks = {"arc_easy": ("mc_loglik", "target"), "mbpp_ppl": ("ref_ppl", "ood")}
    rounds = {
        0: {"arc_easy": BASE["arc_easy"], "mbpp_ppl": BASE["mbpp_ppl"]},
        2: {"arc_easy": later(2)["arc_easy"], "mbpp_ppl": later(2)["mbpp_ppl"]},
    }
    run = load_run(make_eval_run(tmp_path, "mc", rounds, tasks=tasks))
    fig = target_delta_chart([run])
    rows = run.changes()
    first = rows[rows["task"] == "arc_easy"].sort_values("step").iloc[0]
    want = round(100 * (first["chance"] - first["base"]), 1)
    assert first["chance"] == pytest.approx(0.25)
    [chance] = traces(fig, "chance")
    assert chance.name == f"chance (Δ {fmt.signed(want, 1)} points)"
    assert any(s.y0 == s.y1 == pytest.approx(want) for s in fig.layout.shapes)


def test_score_vs_masked_names_each_line_as_a_reader_does():
    """The τ sweep's chart: one line per task and metric, named like every other chart (no
    internal names such as `nll_easy` in the legend)."""
    import pandas as pd

    from core.viz.compare_charts import score_vs_masked_chart

    table = pd.DataFrame(
        {
            "label": ["gt", "stm τ=2", "stm τ=3"],
            "masked %": [None, 30.0, 12.0],
            "mbpp_ppl nll": [1.1, 1.2, 1.15],
            "mbpp_ppl nll_easy": [0.3, 0.2, 0.25],
        }
    )
    fig = score_vs_masked_chart(table, ["mbpp_ppl nll", "mbpp_ppl nll_easy"])
    assert [t.name for t in fig.data] == [
        "mbpp_ppl NLL per token",
        "mbpp_ppl NLL on base-easy tokens (diagnostic)",
    ]
    assert list(fig.data[0].x) == [0.0, 12.0, 30.0]  # ground truth masks nothing
