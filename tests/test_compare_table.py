"""Compare's runs table as a reader sees it: finished runs by default, a toggle for the rest,
findings and frontiers above the table, every cell through core/fmt with one missing marker,
every column titled and explained, the key columns pinned, and the report printing the same
text as the page."""

import html
import json
import re

import pytest
from streamlit.testing.v1 import AppTest

from core import fmt
from core.jobs.registry import JobRegistry
from core.study.report import build_report
from core.study.runs import (
    FINISHED,
    NOT_APPLICABLE,
    UNFINISHED,
    list_runs,
    load_run,
    run_status,
    runs_columns,
    runs_display_table,
    runs_table,
)
from tests.eval_runs import BASE, later, make_eval_run
from tests.factories import make_adapter_run, make_run

BASE_SCORES = {"mbpp": ("pass@1", 0.20, "target"), "gsm8k": ("acc", 0.10, "ood")}


def _finished(root, run_id, method, tau, share, target=0.25, bwt=-50.0, ti=25.0):
    later_scores = {"mbpp": ("pass@1", target, "target"), "gsm8k": ("acc", 0.05, "ood")}
    return make_run(
        root,
        run_id,
        method,
        tau,
        share,
        {0: BASE_SCORES, 4: later_scores},
        {0: (0.0, 0.0), 4: (bwt, ti)},
    )


@pytest.fixture
def mixed_env(tmp_path, monkeypatch):
    """Two finished runs (a ground-truth run whose config carries the default τ = 2.5, and an
    STM run), one failed, one cancelled, one running and one left unfinished without a job."""
    root = tmp_path / "runs"
    monkeypatch.setenv("PLENS_RUNS_DIR", str(root))
    _finished(root, "gt1", "gt", 2.5, None)
    _finished(root, "stm1", "stm", 2.5, 0.3, target=0.2212345, ti=10.56789)
    registry = JobRegistry(root)
    for run_id, status in (("fail1", "failed"), ("cancel1", "cancelled"), ("live1", "running")):
        folder = make_eval_run(root, run_id, {0: BASE, 2: later(2)}, method="stm")
        job = registry.register_foreground("train", {"method": "stm"}, device="cpu", run_dir=folder)
        if status != "running":
            registry.finish(job.id, status, 1, status)
    make_eval_run(root, "stale1", {0: BASE, 2: later(2)}, method="random")
    return root


def page() -> AppTest:
    return AppTest.from_file("../pages/compare.py", default_timeout=60)


def runs_frame(at: AppTest):
    return next(d for d in at.dataframe if "TI %" in d.value.columns)


def column_config(frame) -> dict[str, dict]:
    """Column -> its column_config (title, help, pinned) as the page sent it."""
    return {c: spec for c, spec in json.loads(frame.proto.columns).items() if c != "_index"}


def test_run_status_from_the_job_else_the_run_folder(mixed_env):
    runs = {run.run_id: run for run in list_runs(mixed_env)}
    assert run_status(runs["gt1"]) == FINISHED  # summary.json and a "done" record
    assert run_status(runs["stale1"]) == UNFINISHED  # no job, no summary
    assert run_status(runs["gt1"], "succeeded") == FINISHED
    assert run_status(runs["gt1"], "running") == "running"  # a resumed run: the job wins
    assert run_status(runs["stale1"], "failed") == "failed"


def test_compare_shows_finished_runs_by_default_and_a_toggle_adds_the_rest(mixed_env):
    at = page().run()
    assert not at.exception, [e.value for e in at.exception]
    [toggle] = at.toggle
    assert toggle.label == "Include running, failed and cancelled runs" and not toggle.value
    picker = at.multiselect[0]
    assert sorted(picker.options) == ["gt · gt1", "stm τ=2.5 · stm1"]
    assert sorted(runs_frame(at).value["run"]) == ["gt1", "stm1"]
    assert "status" not in runs_frame(at).value.columns
    captions = " ".join(c.value for c in at.caption)
    assert "2 finished runs; not shown: 1 cancelled, 1 failed, 1 running, 1 unfinished." in captions
    report = at.multiselect(key="report-runs")
    assert sorted(report.options) == sorted(picker.options)  # the report offers the same runs

    at.toggle(key="cmp-all").set_value(True).run()
    assert not at.exception
    options = at.multiselect[0].options
    assert {
        "stm τ=2.5 · fail1 (failed)",
        "stm τ=2.5 · cancel1 (cancelled)",
        "stm τ=2.5 · live1 (running)",
        "random τ=2.5 · stale1 (unfinished)",
    } <= set(options)
    assert sorted(at.multiselect[0].value) == ["gt1", "stm1"]  # the choice is kept
    at.multiselect[0].select("fail1").run()
    table = runs_frame(at).value.set_index("run")
    assert table.loc["fail1", "status"] == "failed" and table.loc["gt1", "status"] == "finished"
    assert column_config(runs_frame(at))["status"]["label"] == "Status"


def test_a_link_naming_a_failed_run_opens_with_it_shown(mixed_env):
    at = page()
    at.query_params["cmp"] = "fail1,gt1"
    at.run()
    assert not at.exception
    assert at.toggle[0].value
    assert sorted(runs_frame(at).value["run"]) == ["fail1", "gt1"]


def test_findings_and_frontiers_come_before_the_runs_table(mixed_env):
    at = page().run()
    assert not at.exception
    drawn = _walk(at.main)
    first_table = drawn.index("dataframe")
    assert drawn[:first_table].count("plotly_chart") == 2  # the drift and forgetting frontiers
    assert drawn.index("Findings") < drawn.index("plotly_chart") < drawn.index("Runs")
    assert drawn.index("Runs") < first_table
    findings = next(m.value for m in at.markdown if m.value.startswith("- **"))
    assert "- **stm τ=2.5 · stm1**\n    - target mbpp pass@1 at step 4 vs step 0:" in findings


def _walk(node) -> list[str]:
    """The page's subheader texts, dataframes and charts, in page order."""
    out = []
    kind = getattr(node, "type", "")
    if kind == "subheader":
        out.append(node.value)
    elif kind in ("dataframe", "plotly_chart"):
        out.append(kind)
    for child in getattr(node, "children", {}).values():
        out += _walk(child)
    return out


def test_the_table_reads_like_a_results_table(mixed_env):
    at = page().run()
    frame = runs_frame(at)
    table = frame.value.set_index("run")
    # τ does not apply to ground truth, whatever its config's default says
    assert table.loc["gt1", "tau"] == NOT_APPLICABLE and table.loc["stm1", "tau"] == "2.5"
    assert table.loc["stm1", "masked %"] == "30.0%" and table.loc["gt1", "masked %"] == "0.0%"
    # numbers rounded by core/fmt, changes signed with their interval or lack of one
    assert table.loc["stm1", "mbpp pass@1"] == "0.221"
    assert table.loc["stm1", "TI %"] == "+10.6% (no interval)"
    assert table.loc["gt1", "train s"] == "40s" and table.loc["gt1", "prep s"] == "0s"
    cells = " ".join(str(v) for v in frame.value.to_numpy().ravel())
    assert "None" not in cells and "nan" not in cells.lower()
    # every column has a readable title and says what it means; the key columns are pinned
    config = column_config(frame)
    assert set(config) == set(frame.value.columns)
    for column, spec in config.items():
        assert spec["label"] and len(spec["help"]) > 20, column
    titles = {spec["label"] for spec in config.values()}
    assert {"Run", "Setup", "τ", "Masked tokens", "Data prep time", "Training time"} <= titles
    assert "prep s" not in titles and "train s" not in titles
    assert [c for c, spec in config.items() if spec.get("pinned")] == ["run", "label"]


def test_one_missing_marker_for_unknown_values(tmp_path):
    folder = make_eval_run(tmp_path, "only0", {0: BASE}, method="stm")  # step 0 only
    shown = runs_display_table(runs_table([load_run(folder)])).iloc[0]
    assert shown["target Δ"] == shown["BWT %"] == shown["TI %"] == fmt.MISSING
    assert shown["train s"] == shown["prep s"] == fmt.MISSING
    assert {str(v) for v in shown} & {"None", "nan", "-"} == set()


def _report_rows(text: str) -> tuple[list[str], dict[str, list[str]]]:
    """The report's runs table: header titles and each run's cell texts (by run id)."""
    table = text.split("<h2>Runs</h2>")[1].split("</table>")[0]
    titles = [html.unescape(t) for t in re.findall(r"<th(?: [^>]*)?>(.*?)</th>", table)]
    rows = {}
    for row in re.findall(r"<tr>(.*?)</tr>", table.split("<tbody>")[1]):
        cells = [html.unescape(c) for c in re.findall(r"<td>(.*?)</td>", row)]
        rows[cells[0]] = cells
    return titles, rows


def test_the_report_prints_the_page_tables_text(mixed_env):
    at = page().run()
    frame = runs_frame(at)
    config = column_config(frame)
    text = build_report([load_run(mixed_env / r) for r in frame.value["run"]])
    titles, rows = _report_rows(text)
    assert titles == [config[c]["label"] for c in frame.value.columns]
    for record in frame.value.to_dict("records"):
        assert rows[record["run"]] == [str(v) for v in record.values()]
    # the same value, the same text: the STM run's TI and its rounded target score
    stm = dict(zip(titles, rows["stm1"], strict=True))
    assert stm["TI (target gain)"] == "+10.6% (no interval)" and stm["mbpp pass@1"] == "0.221"
    assert stm["τ"] == "2.5" and dict(zip(titles, rows["gt1"], strict=True))["τ"] == "n/a"
    # each header carries its help text as a tooltip
    helps = {html.unescape(h) for h in re.findall(r'<th title="([^"]*)"', text)}
    assert {spec["help"] for spec in config.values()} <= helps


def test_runs_columns_name_score_columns_readably(tmp_path):
    _finished(tmp_path, "gt1", "gt", None, None)
    shown = runs_display_table(runs_table([load_run(tmp_path / "gt1")]))
    columns = runs_columns(shown)
    assert columns["mbpp pass@1"][0] == "mbpp pass@1"
    assert "last evaluation round" in columns["mbpp pass@1"][1]


def test_config_diff_says_not_set_with_the_one_missing_marker(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    monkeypatch.setenv("PLENS_RUNS_DIR", str(root))
    _finished(root, "gt1", "gt", None, None)
    _finished(root, "stm1", "stm", 2.5, 0.3)
    at = page().run()
    assert not at.exception
    frame = next(d for d in at.dataframe if "setting" in d.value.columns)
    diff = frame.value.set_index("setting")
    pair = {diff.loc["tau", "A"], diff.loc["tau", "B"]}
    assert pair == {fmt.MISSING, "2.5"} and "null" not in frame.value.to_numpy().ravel()
    config = column_config(frame)
    assert config["setting"]["pinned"] and all(spec["help"] for spec in config.values())


def test_the_lora_table_is_titled_explained_and_rounded(tmp_path, monkeypatch, tiny_model_dir):

    root = tmp_path / "runs"
    monkeypatch.setenv("PLENS_RUNS_DIR", str(root))
    make_adapter_run(root, "stm-tiny", tiny_model_dir)
    at = page()
    at.query_params["drun"] = "stm-tiny"
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    frame = next(d for d in at.dataframe if "fro_norm" in d.value.columns)
    config = column_config(frame)
    assert config["fro_norm"]["label"] == "‖ΔW‖_F" and config["module"]["pinned"]
    assert all(spec["label"] and spec["help"] for spec in config.values())
    for cell in [*frame.value["fro_norm"], *frame.value["effective_rank"]]:  # 3 significant digits
        assert cell == fmt.num(float(cell.replace(",", "")))


def test_turning_the_toggle_off_hides_a_linked_failed_run_again(mixed_env):
    at = page()
    at.query_params["cmp"] = "fail1,gt1"
    at.run()
    at.toggle(key="cmp-all").set_value(False).run()
    assert not at.exception
    assert not at.toggle[0].value
    assert list(runs_frame(at).value["run"]) == ["gt1"]
    at.run()  # and it stays off on the next rerun
    assert not at.toggle[0].value and list(runs_frame(at).value["run"]) == ["gt1"]
