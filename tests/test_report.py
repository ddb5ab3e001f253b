"""Run comparison table and the self-contained HTML report, from hand-made run folders."""

import json
import re

import pytest

from core.errors import LensError
from core.report import build_report, write_report
from core.runs import list_runs, load_run, runs_table


def _make_run(root, run_id, method, tau, share, scores, bwt_ti, seed=0):
    folder = root / run_id
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(
        json.dumps({"method": method, "tau": tau, "seed": seed, "model": "default"})
    )
    recs = [{"kind": "data", "time": 100.0, "method": method, "tau": tau, "masked_share": share}]
    recs += [
        {
            "kind": "train",
            "step": s,
            "epoch": s / 4,
            "time": 100.0 + s,
            "loss": 2.0 - 0.1 * s,
            "lr": 1e-4,
        }
        for s in range(1, 5)
    ]
    for step, values in scores.items():
        for task, (metric, value, role) in values.items():
            recs.append(
                {
                    "kind": "eval",
                    "step": step,
                    "task": task,
                    "metric": metric,
                    "value": value,
                    "n": 20,
                    "role": role,
                }
            )
    for step, (bwt, ti) in bwt_ti.items():
        recs.append({"kind": "eval_summary", "step": step, "bwt": bwt, "ti": ti})
    recs.append({"kind": "done", "step": 4})
    text = "".join(json.dumps(r) + "\n" for r in recs) + '{"kind": "tra'  # half-written last line
    (folder / "metrics.jsonl").write_text(text)
    (folder / "summary.json").write_text(
        json.dumps({"train_runtime_s": 40.0, "wall_time_s": 60.0, "finished": 160.0})
    )
    return folder


@pytest.fixture
def runs_root(tmp_path):
    base = {"mbpp": ("pass@1", 0.20, "target"), "gsm8k": ("acc", 0.10, "ood")}
    _make_run(tmp_path, "gt1", "gt", None, None,
              {0: base, 4: {"mbpp": ("pass@1", 0.25, "target"), "gsm8k": ("acc", 0.05, "ood")}},
              {0: (0.0, 0.0), 4: (-50.0, 25.0)})  # fmt: skip
    _make_run(tmp_path, "stm1", "stm", 2.5, 0.3,
              {0: base, 4: {"mbpp": ("pass@1", 0.22, "target"), "gsm8k": ("acc", 0.10, "ood")}},
              {0: (0.0, 0.0), 4: (0.0, 10.0)})  # fmt: skip
    return tmp_path


def test_runs_table_lines_runs_up(runs_root):
    runs = [load_run(runs_root / "gt1"), load_run(runs_root / "stm1")]
    table = runs_table(runs).set_index("run")
    assert table.loc["gt1", "mbpp pass@1"] == pytest.approx(0.25)
    assert table.loc["gt1", "target Δ%"] == pytest.approx(25.0)
    assert table.loc["stm1", "target Δ%"] == pytest.approx(10.0)
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
    assert (
        text.count('class="plotly-graph-div"') == 6
    )  # loss, mbpp, gsm8k, BWT, frontier, score vs masked


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
