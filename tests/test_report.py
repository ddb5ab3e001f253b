"""Run comparison table and the self-contained HTML report, from hand-made run folders."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest

from core.errors import LensError
from core.study.report import build_report, write_report
from core.study.runs import list_runs, load_run, runs_table
from tests.factories import make_adapter_run, make_gt_and_stm_runs


@pytest.fixture
def runs_root(tmp_path):
    return make_gt_and_stm_runs(tmp_path)


def test_runs_table_lines_runs_up(runs_root):
    runs = [load_run(runs_root / "gt1"), load_run(runs_root / "stm1")]
    table = runs_table(runs).set_index("run")
    assert table.loc["gt1", "mbpp pass@1"] == pytest.approx(0.25)
    # the target's change from step 0 in points (no saved per-item rounds here: no interval)
    assert table.loc["gt1", "target"] == "mbpp pass@1"
    assert table.loc["gt1", "target Δ"] == pytest.approx(5.0)
    assert table.loc["stm1", "target Δ"] == pytest.approx(2.0)
    assert table.loc["gt1", "target Δ unit"] == "points"
    assert pd.isna(table.loc["gt1", "target Δ low"]) and pd.isna(table.loc["gt1", "BWT low"])
    assert table.loc["gt1", "BWT"] == -50.0 and table.loc["stm1", "TI"] == 10.0
    assert table.loc["stm1", "masked %"] == pytest.approx(30.0)
    assert table.loc["stm1", "label"] == "stm τ=2.5"
    assert table.loc["gt1", "train s"] == 40.0
    assert table.loc["gt1", "prep s"] == pytest.approx(0.0)
    assert len(load_run(runs_root / "gt1").train_frame()) == 4  # half-written line skipped
    assert {r.run_id for r in list_runs(runs_root)} == {"gt1", "stm1"}


def test_report_is_self_contained_and_shows_every_run(runs_root, tmp_path):
    out = write_report([runs_root / "gt1", runs_root / "stm1"], tmp_path / "out" / "report.html")
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>")
    assert "gt1" in text and "stm1" in text and "stm τ=2.5" in text
    assert text.count("Forgetting frontier") == 1 and "Training loss" in text
    # plotly.js inlined once, nothing fetched from the network
    assert len(re.findall(r"<script[^>]+src=", text)) == 0
    assert "<link" not in text and "@import" not in text
    # target Δ, BWT, loss; Δ of mbpp and gsm8k; frontier, score vs masked
    assert text.count('class="plotly-graph-div"') == 7
    # the runs table gives each change with its interval, or says it has none
    assert "-50.0% (no interval)" in text and "+5.0 points (no interval)" in text
    assert "no per-item results saved for this run: no interval" in text


def test_report_carries_the_top_row_per_task_charts_and_findings(tmp_path):
    from core.viz.run_charts import task_delta_charts, top_row_charts
    from tests.eval_runs import BASE, later, make_eval_run

    runs = [
        load_run(make_eval_run(tmp_path, "stm1", {0: BASE, 2: later(2), 4: later(4)})),
        load_run(make_eval_run(tmp_path, "gt1", {0: BASE, 2: later(1)}, method="gt")),
    ]
    text = build_report(runs)
    for _, fig in [*top_row_charts(runs), *task_delta_charts(runs)]:  # the Runs page's charts
        assert f'"text":{json.dumps(fig.layout.title.text)}' in text
    assert text.count('"role":"band"') == 2 * (2 + 3)  # target, BWT, 3 tasks: each run's band
    # findings with their intervals and verdicts
    findings = text.split("<h2>Findings</h2>")[1].split("</ul>")[0]
    assert "stm τ=2.5 · stm1: target mbpp_ppl nll at step 4 vs step 0: -0.240 [" in findings
    assert "nats: better." in findings and "%: worse." in findings
    table = text.split("<h2>Runs</h2>")[1].split("</table>")[0]
    assert ">BWT (forgetting)</th>" in table and re.search(
        r"<td>-\d+\.\d \[-\d+\.\d, -\d+\.\d\]%</td>", table
    )
    assert "nan" not in table.lower()


def test_report_errors_are_clear(tmp_path):
    with pytest.raises(LensError, match="No run"):
        load_run(tmp_path / "nope")
    with pytest.raises(LensError, match="at least one run"):
        build_report([])


def test_report_cli(runs_root, tmp_path, capsys):
    from core.cli import main

    out = tmp_path / "r.html"
    assert main(["report", str(runs_root / "gt1"), str(runs_root / "stm1"), "--out", str(out)]) == 0
    assert out.stat().st_size > 100_000 and "opens offline" in capsys.readouterr().err
    assert main(["report", "no-such-run", "--out", str(tmp_path / "x.html")]) == 2
    assert "No run 'no-such-run'" in capsys.readouterr().err
    assert not (tmp_path / "x.html").exists()


def _chart_configs(text):
    """The PNG-download settings of each plotly chart in a report."""
    return re.findall(
        r'"toImageButtonOptions":\s*\{"format":\s*"png",\s*"filename":\s*"([^"]+)"', text
    )


def test_every_report_chart_offers_a_png_download(runs_root, tmp_path):
    text = write_report([runs_root / "gt1", runs_root / "stm1"], tmp_path / "r.html").read_text()
    names = _chart_configs(text)
    assert len(names) == text.count('class="plotly-graph-div"') == 7
    assert len(set(names)) == 7 and "forgetting_frontier_up_and_right_is_better" in names
    assert '"displayModeBar": false' not in text
    removed = re.findall(r'"modeBarButtonsToRemove":\s*\[([^\]]*)\]', text)
    assert len(removed) == 7 and not any("toImage" in r for r in removed)


def test_report_snapshots_show_the_runs_mask_and_the_ppl_change(tiny_model_dir, tmp_path):
    from core.study.diagnostics import compute_ppl_change, training_examples
    from core.study.report import heatmap_snapshots

    run_dir = make_adapter_run(tmp_path / "runs", "stm-run", tiny_model_dir)
    snapshots = heatmap_snapshots(load_run(run_dir), 2, device="cpu", dtype="float32")
    assert [s.example.id for s in snapshots] == ["ex-1", "ex-2"]
    for s in snapshots:  # STM at τ = 2.5: exactly the tokens above τ are masked
        assert s.tau == 2.5 and s.masked == [p > 2.5 for p in s.example.ppl]
    examples = training_examples(load_run(run_dir).config, 3)
    changes = [
        compute_ppl_change(
            run_dir, examples[:k], label=f"{k} training examples", device="cpu", dtype="float32"
        )
        for k in (3, 2)
    ]
    out = write_report(
        [run_dir], tmp_path / "report.html", n_examples=2, device="cpu", dtype="float32"
    ).read_text()
    assert "Token perplexity of selected examples" in out
    n_response = sum(s.example.n_response for s in snapshots)
    assert out.count("data-ppl=") == n_response
    n_masked = sum(sum(s.masked) for s in snapshots)
    assert len(re.findall(r'class="pl-t[^"]*\bpl-m\b', out)) == n_masked
    assert "Token perplexity change after fine-tuning" in out and "3 training examples" in out
    assert out.count("data-delta=") == sum(ex.n_response for c in changes for ex in c.base) > 0
    assert "tokens more surprising" in out
    # still one offline file: plotly.js once, no network references; every chart has its PNG
    # one Δ histogram per result, each its own PNG name (the run has no loss or evaluation to
    # chart: the findings say so)
    names = _chart_configs(out)
    assert out.count("Plotly.newPlot") == len(names) == len(set(names)) == 2
    assert "stm-run: no evaluation rounds yet." in out
    assert not re.findall(r"<script[^>]+src=|<link|@import|url\(\s*['\"]?https?:", out)
    without = write_report([run_dir], tmp_path / "r2.html", include_ppl_changes=False).read_text()
    assert "data-delta=" not in without and "data-ppl=" not in without


def test_report_cli_examples_flag(tiny_model_dir, tmp_path, capsys):
    from core.cli import main

    run_dir = make_adapter_run(tmp_path / "runs", "gt-run", tiny_model_dir, method="gt")
    out = tmp_path / "r.html"
    argv = ["report", str(run_dir), "--out", str(out), "--examples", "1", "--device", "cpu"]
    assert main(argv) == 0
    text = out.read_text()
    assert text.count('class="pl-root"') == 1 and "every response token trained" in text
    assert "pl-m" not in text.split("Token perplexity of selected examples")[1].split("</style>")[1]
    assert main(["report", str(run_dir), "--out", str(out), "--examples", "-1"]) == 2
    assert "--examples must be 0 or more" in capsys.readouterr().err


@pytest.mark.e2e
def test_report_png_buttons_in_a_browser(runs_root, tmp_path):
    """Offline in Chromium: every chart of the report draws, with the modebar's PNG button."""
    import shutil

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip("Chromium is not installed")
    from playwright.sync_api import sync_playwright

    out = write_report([runs_root / "gt1", runs_root / "stm1"], tmp_path / "r.html")
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page()
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(out.as_uri())
        page.wait_for_selector(".plotly-graph-div .main-svg")
        buttons = page.locator('.modebar-btn[data-title="Download plot as a PNG"]')
        charts = page.locator(".plotly-graph-div")
        assert charts.count() == 7 and buttons.count() == 7
        browser.close()
    assert all(url.startswith(("file:", "data:", "about:")) for url in requests), requests


def test_report_carries_drift_charts_table_and_frontier(tmp_path):
    from core.viz.run_charts import drift_charts
    from tests.eval_runs import BASE_DRIFT, DRIFT_TASKS, later_drift, make_eval_run

    rounds = {0: BASE_DRIFT, 2: later_drift(2), 4: later_drift(4)}
    runs = [
        load_run(make_eval_run(tmp_path, "stm1", rounds, tasks=DRIFT_TASKS)),
        load_run(
            make_eval_run(
                tmp_path, "gt1", {0: BASE_DRIFT, 4: later_drift(8)}, method="gt", tasks=DRIFT_TASKS
            )
        ),
    ]
    text = build_report(runs)
    for _, fig in drift_charts(runs):
        assert f'"text":{json.dumps(fig.layout.title.text)}' in text
    table = text.split("<h2>Drift from the base model</h2>")[1].split("</table>")[0]
    assert "token KL(base ‖ tuned), nats" in table and "top-1 agreement" in table
    assert re.search(r"<td>\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]</td>", table)
    assert "sharpening toward the base" in text  # how to read KL
    assert "nan" not in table.lower()
