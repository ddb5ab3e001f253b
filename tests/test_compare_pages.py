"""AppTest smoke tests of the Runs and Compare pages on hand-made run folders."""

import json
import time

import pytest
from streamlit.testing.v1 import AppTest

from tests.eval_runs import BASE, BASE_DRIFT, DRIFT_TASKS, later, later_drift, make_eval_run
from tests.factories import make_adapter_run, make_gt_and_stm_runs


def run_until(at: AppTest, done, timeout: float = 120.0) -> AppTest:
    """Rerun the page (as the polling fragment would) until `done(at)` or the timeout."""
    deadline = time.time() + timeout
    while not done(at):
        assert not at.exception, [e.value for e in at.exception]
        assert time.time() < deadline, "timed out waiting for background work"
        time.sleep(0.5)
        at.run()
    return at


@pytest.fixture
def runs_env(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    monkeypatch.setenv("PLENS_RUNS_DIR", str(root))
    return make_gt_and_stm_runs(root)


def charts(at: AppTest) -> dict[str, dict]:
    """Chart key (`runs-chart-...`) -> the figure the page drew, in page order."""
    return {c.proto.id.split("-", 2)[2]: json.loads(c.proto.spec) for c in at.get("plotly_chart")}


def roles(fig: dict) -> list[tuple[str, str]]:
    return [(t["meta"]["role"], t["meta"]["run"]) for t in fig["data"] if "meta" in t]


@pytest.fixture
def rounds_env(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    monkeypatch.setenv("PLENS_RUNS_DIR", str(root))
    make_eval_run(root, "stm1", {0: BASE, 2: later(2), 4: later(4)})
    make_eval_run(root, "gt1", {0: BASE, 2: later(1)}, method="gt")
    return root


def test_runs_page_top_row_then_each_task_then_one_picked_metric(rounds_env):
    at = AppTest.from_file("../pages/runs.py", default_timeout=60).run()
    assert not at.exception
    drawn = charts(at)
    assert list(drawn) == [
        "runs-chart-target",
        "runs-chart-bwt",
        "runs-chart-ood-drift",
        "runs-chart-target-drift",
        "runs-chart-loss",
        "runs-chart-task-mbpp_ppl",
        "runs-chart-task-arc_easy",
        "runs-chart-task-gsm8k_ppl",
        "runs-chart-metric",
    ]
    for key in ("runs-chart-target", "runs-chart-bwt"):  # every run: its band and its line
        assert sorted(roles(drawn[key])) == [
            ("band", "gt1"),
            ("band", "stm1"),
            ("line", "gt1"),
            ("line", "stm1"),
        ]
    assert sorted(roles(drawn["runs-chart-loss"])) == [("line", "gt1"), ("line", "stm1")]
    captions = [c.value for c in at.caption]
    assert any("stm τ=2.5 · stm1, step 4:" in c and "nats: better." in c for c in captions)
    # one picker for the raw values: exactly the chosen metric, one line per run
    assert drawn["runs-chart-metric"]["layout"]["title"]["text"] == "mbpp_ppl NLL per token"
    at.selectbox(key="runs-metric").set_value("gsm8k_ppl|ppl").run()
    assert not at.exception
    picked = charts(at)["runs-chart-metric"]
    assert picked["layout"]["title"]["text"] == "gsm8k_ppl perplexity"
    assert sorted(roles(picked)) == [("line", "gt1"), ("line", "stm1")]
    assert len(at.get("plotly_chart")) == 9  # not one chart per raw metric


def test_runs_page_on_runs_without_saved_rounds(runs_env):
    at = AppTest.from_file("../pages/runs.py", default_timeout=60).run()
    assert not at.exception
    drawn = charts(at)
    assert list(drawn)[:5] == [
        "runs-chart-target",
        "runs-chart-bwt",
        "runs-chart-ood-drift",
        "runs-chart-target-drift",
        "runs-chart-loss",
    ]
    # runs from before drift: the drift charts are empty and say why
    assert not roles(drawn["runs-chart-ood-drift"])
    assert any("gt1: no OOD drift measured" in c.value for c in at.caption)
    assert "gt1" in at.dataframe[0].value["run"].tolist()
    target = drawn["runs-chart-target"]
    assert sorted(roles(target)) == [("line", "gt1"), ("line", "stm1")]  # no band: no items
    assert any("no per-item results saved" in c.value for c in at.caption)
    assert not any("nan" in c.value.lower() for c in at.caption)


def test_compare_page_single_run_frontier(rounds_env):
    at = AppTest.from_file("../pages/compare.py", default_timeout=60)
    at.query_params["cmp"] = "stm1"
    at.run()
    assert not at.exception
    shown = at.dataframe[0].value.set_index("run")
    assert list(shown.index) == ["stm1"] and shown.loc["stm1", "BWT %"].count("[") == 1
    [frontier] = [
        json.loads(c.proto.spec)
        for c in at.get("plotly_chart")
        if "frontier" in c.proto.spec and "Forgetting" in c.proto.spec
    ]
    [point] = [t for t in frontier["data"] if t.get("meta", {}).get("role") == "line"]
    assert len(point["x"]) == 1 and point["error_x"]["array"] and point["error_y"]["array"]
    assert any("A comparison needs a second run." in c.value for c in at.caption)


def test_compare_page_table_and_report(runs_env):
    at = AppTest.from_file("../pages/compare.py", default_timeout=60).run()
    assert not at.exception
    table = at.dataframe[0].value.set_index("run")
    assert table.loc["gt1", "BWT %"] == "-50.0% (no interval)"
    assert table.loc["stm1", "TI %"] == "+10.0% (no interval)"
    assert table.loc["gt1", "target Δ"] == "+5.0 points (no interval)"
    at.number_input(key="report-snapshots").set_value(0).run()
    build = next(b for b in at.button if b.label == "Build report")
    build.click().run()
    at = run_until(at, lambda at: any("Report ready" in s.value for s in at.success))
    assert not at.exception
    [download] = at.get("download_button")
    assert "Download report.html" in str(download.proto)


def test_compare_page_without_runs_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("PLENS_RUNS_DIR", str(tmp_path / "empty"))
    at = AppTest.from_file("../pages/compare.py", default_timeout=60).run()
    assert not at.exception
    assert any("No runs yet" in i.value for i in at.info)


def test_token_ppl_change_runs_in_the_background_and_is_saved(
    tmp_path, monkeypatch, tiny_model_dir
):
    root = tmp_path / "runs"
    monkeypatch.setenv("PLENS_RUNS_DIR", str(root))
    run_dir = make_adapter_run(root, "stm-tiny", tiny_model_dir)

    def open_page() -> AppTest:
        at = AppTest.from_file("../pages/compare.py", default_timeout=60)
        at.query_params.update(drun="stm-tiny", dsrc="train", dn="2")
        return at.run()

    at = open_page()
    assert not at.exception, [e.value for e in at.exception]
    assert any("Not computed yet for these 2 examples" in c.value for c in at.caption)
    compute = next(b for b in at.button if b.label == "Compute token perplexity change")
    compute.click().run()
    assert not at.exception
    at = run_until(at, lambda at: any(m.label == "Tokens more surprising" for m in at.metric))
    metrics = {m.label: m.value for m in at.metric}
    assert int(metrics["Tokens (2 examples)"]) > 0
    heatmaps = [h for h in at.get("html") if "data-delta=" in h.proto.body]
    assert len(heatmaps) == 2
    [saved] = (run_dir / "diagnostics").glob("ppl_change-*.json")

    reloaded = open_page()  # a new session: shown from the run folder, no button, no task
    assert {m.label: m.value for m in reloaded.metric} == metrics
    assert not [b for b in reloaded.button if b.label == "Compute token perplexity change"]
    assert saved.is_file()


def test_token_ppl_change_needs_a_finished_run(runs_env):
    at = AppTest.from_file("../pages/compare.py", default_timeout=60)
    at.query_params["drun"] = "gt1"
    at.run()
    assert not at.exception
    assert any("has no saved final model yet" in i.value for i in at.info)


@pytest.fixture
def drift_env(tmp_path, monkeypatch):
    """Runs evaluated with drift probes (stm1: three rounds, gt1: one after step 0) and an old
    run whose rounds predate drift."""
    root = tmp_path / "runs"
    monkeypatch.setenv("PLENS_RUNS_DIR", str(root))
    make_eval_run(
        root, "stm1", {0: BASE_DRIFT, 2: later_drift(2), 4: later_drift(4)}, tasks=DRIFT_TASKS
    )
    make_eval_run(root, "gt1", {0: BASE_DRIFT, 3: later_drift(3)}, method="gt", tasks=DRIFT_TASKS)
    make_eval_run(root, "old1", {0: BASE, 2: later(2)}, method="random")
    return root


def test_runs_page_charts_drift_beside_target_and_bwt_and_tables_the_latest_round(drift_env):
    at = AppTest.from_file("../pages/runs.py", default_timeout=60)
    at.query_params["runs"] = "stm1,gt1,old1"
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    drawn = charts(at)
    assert list(drawn)[:5] == [
        "runs-chart-target",
        "runs-chart-bwt",
        "runs-chart-ood-drift",
        "runs-chart-target-drift",
        "runs-chart-loss",
    ]
    # each drift probe is drawn once: at the top, not again among the per-task charts
    assert "runs-chart-task-ood_drift" not in drawn and "runs-chart-task-target_drift" not in drawn
    for key, title in (
        ("runs-chart-ood-drift", "OOD drift"),
        ("runs-chart-target-drift", "Target drift"),
    ):
        fig = drawn[key]
        assert fig["layout"]["title"]["text"] == f"{title}: KL from the base model"
        assert fig["layout"]["yaxis"]["title"]["text"] == "token KL from base, nats"
        assert fig["layout"]["yaxis"]["range"][0] == 0
        assert sorted(roles(fig)) == [("band", "stm1"), ("line", "gt1"), ("line", "stm1")]
        [gt] = [t for t in fig["data"] if t.get("meta", {}).get("run") == "gt1"]
        assert gt["error_y"]["array"][-1] > 0  # one round after step 0: an interval bar
    captions = " ".join(c.value for c in at.caption)
    assert "old1: no OOD drift measured" in captions
    # the latest round's drift, one row per run and probe, under readable names only
    # (a static table whose cells wrap: all its columns fit a 1280 px screen)
    [table] = [t.value for t in at.table if "token KL, nats" in t.value.columns]
    assert set(table["run"]) == {"stm τ=2.5 · stm1", "gt · gt1"} and len(table) == 4
    assert set(table.columns) >= {"top-1 agree", "Δ NLL, nats/token", "KL toward / away"}
    assert not {"kl", "top1_agree", "dnll", "kl_toward", "kl_away"} & set(table.columns)
    assert "sharpening toward the base's own answer as drift just as it counts moving away" in (
        captions
    )
    assert "random τ=2.5 · old1: no drift probes in its rounds" in captions
    options = at.selectbox(key="runs-metric").options
    assert "OOD drift: top-1 agreement with the base (OOD)" in options
    assert not any("dbpb" in o or "Δ bits per byte" in o for o in options)
    assert "nan" not in captions.lower()


def test_runs_page_shows_an_evaluation_round_in_progress_and_what_a_run_without_loss_is(
    tmp_path, monkeypatch
):
    from core.jobs.registry import JobRegistry
    from core.jobs.state import Phase, RunState, write_state

    root = tmp_path / "runs"
    monkeypatch.setenv("PLENS_RUNS_DIR", str(root))
    folder = make_eval_run(root, "live", {0: BASE_DRIFT}, tasks=DRIFT_TASKS, losses=())
    registry = JobRegistry(root)
    job = registry.register_foreground("train", {"method": "stm"}, device="cpu", run_dir=folder)
    state = RunState(
        Phase.EVALUATING,
        step=0,
        max_steps=16,
        task="ood_drift",
        task_index=2,
        tasks=5,
        done=40,
        total=200,
        unit="items",
        elapsed_s=72.0,
    )
    line = "evaluating step 0 of 16: ood_drift (task 3 of 5) · 40/200 items · 1m12s"
    write_state(folder, state)
    registry.set_message(job.id, line)
    at = AppTest.from_file("../pages/runs.py", default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    [bar] = at.get("progress")
    assert bar.proto.value == 20 and bar.proto.text == f"stm τ=2.5 · live: {line}"
    captions = " ".join(c.value for c in at.caption)
    assert "evaluation-only" not in captions  # a training run that is running
    assert "live: a training run, running: no training step logged yet" in captions
    # a training run that failed before its first step says so, never "evaluation-only"
    registry.finish(job.id, "failed", 1, "boom")
    at = AppTest.from_file("../pages/runs.py", default_timeout=60)
    at.query_params["runs"] = "live"
    at.run()
    assert not at.exception
    assert not at.get("progress")  # the job ended: its left-over progress file is not shown
    captions = " ".join(c.value for c in at.caption)
    assert "live: a training run that failed before logging a training step" in captions
    assert "evaluation-only" not in captions


def test_compare_page_draws_the_drift_frontier_beside_the_forgetting_frontier(drift_env):
    at = AppTest.from_file("../pages/compare.py", default_timeout=60)
    at.query_params["cmp"] = "stm1,gt1,old1"
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    figures = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    titles = [f["layout"]["title"]["text"] for f in figures]
    assert titles.index("Target gain vs OOD drift") < titles.index(
        "Forgetting frontier (up and right is better)"
    )
    drift = figures[titles.index("Target gain vs OOD drift")]
    points = [t for t in drift["data"] if t.get("meta", {}).get("role") == "line"]
    assert sorted(r for t in points for r in t["meta"]["runs"]) == ["gt1", "stm1"]
    for trace in points:
        assert trace["error_x"]["array"][0] > 0 and trace["error_y"]["array"][0] > 0
        assert trace["text"] == [trace["name"] if trace["name"] == "gt" else "stm τ=2.5"]
    assert drift["layout"]["yaxis"]["range"][0] == 0
    captions = " ".join(c.value for c in at.caption)
    assert "Not drawn, no drift probes in its rounds: evaluated before drift was measured: " in (
        captions
    )
    assert "random τ=2.5 · old1" in captions
