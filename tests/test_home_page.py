"""The Start page states what the app's own measurements show (the newest finished protocol's
headline, the recorded CPU sweep), read from their files, and links to them: not the paper's
claim."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.study.protocol import headline, short_headline
from core.study.protocol import recorded as protocol_recorded
from tests.factories import finished_protocol, sweep_row

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def runs_root(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    root = tmp_path / "runs"
    root.mkdir()
    monkeypatch.setenv("PLENS_RUNS_DIR", str(root))
    return root


@pytest.fixture
def sweep(tmp_path, monkeypatch):
    rows = [sweep_row("center", -2.8, 0.7), sweep_row("lr3e-4", -7.0, -2.1)]
    data = {
        "date": "2026-12-09",
        "machine": "test cpu, 2 cores",
        "model": "tiny",
        "suite": "protocol",
        "rows": rows,
        **protocol_recorded.sweep_verdict(rows),
    }
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(data))
    monkeypatch.setattr(protocol_recorded, "CPU_SWEEP_JSON", path)
    return data


def start_page() -> AppTest:
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.query_params.update(kind="task", task="mbpp", split="train", limit="3")
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def texts(at: AppTest) -> str:
    return "\n".join(m.value for m in at.markdown)


def test_no_finished_protocol_says_so_and_shows_the_recorded_sweep(runs_root, sweep):
    at = start_page()
    shown = texts(at)
    assert "avoids most of the forgetting" not in shown  # the paper's claim, no longer promised
    assert "No protocol has finished on this machine yet" in shown
    # the sweep's verdict as the file holds it, with its model, machine and date
    assert (
        "**Ground truth alone on a CPU** (tiny, test cpu, 2 cores, 2026-12-09): "
        "Ground truth forgets detectably out of domain in: lr3e-4 (arc_easy acc)." in shown
    )
    assert "[Reproduce the paper](protocol)" in shown and "Paper protocol" in shown


def test_a_finished_protocol_gives_its_headline(runs_root, sweep):
    results = finished_protocol(runs_root)
    at = start_page()
    shown = texts(at)
    assert "No protocol has finished" not in shown
    assert "**protocol-cpu** (" in shown and "4 of 4 training runs finished" in shown
    lines = short_headline(results)
    assert lines and all(f"- {line}" in shown for line in lines)


def test_the_recorded_protocol_is_shown_with_its_machine_and_date(
    runs_root, sweep, tmp_path, monkeypatch
):
    results = finished_protocol(runs_root)
    recorded = {**results, "machine": "test cpu, 2 cores", "date": "2026-12-03", "note": ""}
    path = tmp_path / "cpu_protocol.json"
    path.write_text(json.dumps(recorded))
    monkeypatch.setattr(protocol_recorded, "CPU_PROTOCOL_JSON", path)
    assert protocol_recorded.load_cpu_protocol() is not None
    shown = texts(start_page())
    assert "**Recorded on the project's machine**" in shown
    assert "test cpu, 2 cores, 2026-12-03" in shown
    for line in short_headline(recorded):
        assert line in shown
    # a file without its machine is no record
    path.write_text(json.dumps(results))
    assert protocol_recorded.load_cpu_protocol() is None


def test_the_short_headline_keeps_the_out_of_domain_probe_and_drops_the_others():
    recorded = protocol_recorded.load_cpu_protocol(ROOT / "docs" / "cpu_protocol.json")
    full, short = headline(recorded), short_headline(recorded)
    assert any("text_drift" in line for line in full)  # the full reading has every probe
    assert not any("text_drift" in line or "target_drift" in line for line in short)
    assert [line for line in full if "ood_drift" in line] == [
        line for line in short if "ood_drift" in line
    ]
    assert len(short) < len(full)
