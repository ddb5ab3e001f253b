"""AppTest smoke tests of the "Reproduce the paper" page: launching a protocol job and showing a
finished protocol's table, findings and report."""

import json
import re

import pytest
from streamlit.testing.v1 import AppTest

from core.io import app_root, write_json_atomic
from core.jobs.registry import JobRegistry
from core.jobs.runfiles import CONFIG_JSON
from core.study.protocol import (
    PARTIAL_JSON,
    ProtocolConfig,
    headline,
    load_protocol,
    protocol_eta,
    write_partial_results,
)
from core.study.protocol import recorded as protocol_recorded
from tests.factories import finished_protocol, make_run, sweep_row


@pytest.fixture
def runs_root(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    monkeypatch.setenv("PLENS_RUNS_DIR", str(root))
    # the page shows only this test's protocols, not the project's recorded one
    monkeypatch.setattr(
        protocol_recorded, "CPU_PROTOCOL_JSON", tmp_path / "no-recorded-protocol.json"
    )
    root.mkdir()
    return root


def test_the_recorded_cpu_protocol_opens_the_page_when_none_ran_here(runs_root, monkeypatch):
    """On a fresh machine the page leads with the project's recorded cpu protocol: its
    headline sentences and its summary table, with machine and date."""
    path = app_root() / "docs" / "cpu_protocol.json"
    recorded = protocol_recorded.load_cpu_protocol(path)
    assert recorded is not None  # docs/cpu_protocol.json ships with the project
    monkeypatch.setattr(protocol_recorded, "CPU_PROTOCOL_JSON", path)
    at = AppTest.from_file("../pages/protocol.py", default_timeout=60).run()
    assert not at.exception
    shown = [m.value for m in at.markdown]
    for line in headline(recorded):
        assert f"- {line}" in shown
    assert any(recorded["machine"] in c.value and recorded["date"] in c.value for c in at.caption)
    table = next(d.value for d in at.dataframe if "arm" in d.value.columns).set_index("arm")
    assert table.loc["ground truth", "seeds"] == str(len(recorded["arms"]["gt"]["seeds"]))


def test_empty_page_shows_the_command_and_queues_a_protocol(runs_root):
    registry = JobRegistry()
    # a running foreground job holds the CPU: the protocol, a coordinator that holds no slot,
    # starts at once, and its runs queue behind that job
    blocker = registry.register_foreground("train", {"method": "gt"}, device="cpu")
    at = AppTest.from_file("../pages/protocol.py", default_timeout=60).run()
    assert not at.exception
    assert any("No protocol yet" in i.value for i in at.info)
    assert "python -m core protocol --preset cpu" in at.code[0].value
    at.text_input(key="protocol-seeds").set_value("0,1").run()
    assert "--seeds 0,1" in at.code[0].value
    at.text_input(key="protocol-seeds").set_value("0,x").run()
    assert any("integers" in e.value for e in at.error)  # bad input: a message, no job
    assert [j.kind for j in registry.list()] == ["train"]
    at.text_input(key="protocol-seeds").set_value("0,1").run()
    next(b for b in at.button if b.label == "Start protocol").click().run()
    assert not at.exception
    queued = [j for j in registry.list() if j.kind == "protocol"]
    assert len(queued) == 1 and queued[0].status in ("queued", "running")
    assert queued[0].path == runs_root / "protocol-cpu"
    assert queued[0].config["seeds"] == [0, 1]
    assert at.query_params["protocol"] == ["protocol-cpu"] or at.query_params["protocol"] == (
        "protocol-cpu"
    )
    assert any("0 of 8 runs finished" in str(p.proto) for p in at.get("progress"))  # 4 arms x 2
    registry.cancel(queued[0].id)
    assert registry.get(queued[0].id).status == "cancelled"
    # nothing it queued runs on: its runs were cancelled with it
    assert not [j for j in registry.list() if j.active and j.id != blocker.id]
    registry.finish(blocker.id, "succeeded", 0)


def test_finished_protocol_shows_table_findings_and_report(runs_root):
    results = finished_protocol(runs_root)
    stm = results["arms"]["stm"]["measures"]["ood_nll_easy_Δ%"]
    assert stm["mean"] == pytest.approx(1.1) and stm["n"] == 2
    at = AppTest.from_file("../pages/protocol.py", default_timeout=60).run()
    assert not at.exception
    # the first table is the recorded CPU sweep (docs/cpu_forgetting.json); then the results
    table = next(d.value for d in at.dataframe if "arm" in d.value.columns).set_index("arm")
    assert table.loc["ground truth", "seeds"] == "2"
    assert table.loc["STM τ=2.5", "OOD easy-token NLL Δ%"].startswith("+1.10 ± 1.27")
    assert table.loc["STM τ=2.5", "masked %"].startswith("30.00")
    texts = " ".join(m.value for m in at.markdown)
    assert "STM τ=2.5: out-of-domain NLL on base-easy tokens" in texts
    assert "better than ground truth" in texts  # 1.0-1.2% vs 10.0-10.2%: t-intervals apart
    assert any("4 of 4 runs finished" in str(p.proto) for p in at.get("progress"))
    [download] = at.get("download_button")
    assert "Download the report" in str(download.proto)


def test_page_says_what_the_recorded_cpu_sweep_found(runs_root, tmp_path, monkeypatch):

    rows = [sweep_row("center", -2.8, 0.7), sweep_row("lr3e-4", -7.0, -2.1)]
    path = tmp_path / "sweep.json"
    sweep = {
        "date": "2026-12-02",
        "machine": "test cpu, 2 cores",
        "model": "tiny",
        "suite": "protocol",
        "rows": rows,
        **protocol_recorded.sweep_verdict(rows),
    }
    path.write_text(json.dumps(sweep))
    monkeypatch.setattr(protocol_recorded, "CPU_SWEEP_JSON", path)
    at = AppTest.from_file("../pages/protocol.py", default_timeout=60).run()
    assert not at.exception
    assert any(m.value == sweep["text"] for m in at.markdown)
    assert sweep["text"].startswith("Ground truth forgets detectably out of domain in: lr3e-4")
    table = at.dataframe[0].value
    assert list(table["setting"]) == ["center", "lr3e-4"]
    assert table["arc_easy acc"].iloc[1] == "-4.55 [-7.00, -2.10]*"
    monkeypatch.setattr(protocol_recorded, "CPU_SWEEP_JSON", tmp_path / "missing.json")
    at = AppTest.from_file("../pages/protocol.py", default_timeout=60).run()
    assert not at.exception and any("No recorded sweep" in c.value for c in at.caption)


def test_protocol_eta_is_the_finished_runs_pace():
    assert protocol_eta([], 6, 0, None) is None  # nothing measured: no guess
    assert protocol_eta([600.0, 1200.0], 6, 2, None) == 4 * 900.0
    # the running run has spent 300 s of its expected 900
    assert protocol_eta([600.0, 1200.0], 6, 2, 300.0) == 3 * 900.0 + 600.0
    assert protocol_eta([600.0], 6, 2, 5000.0) == 3 * 600.0  # overdue: the rest still count
    assert protocol_eta([600.0], 2, 2, None) == 0.0


def test_a_running_protocol_shows_the_arm_the_eta_and_partial_results(runs_root):
    """2 of 4 runs finished (60 s each), STM seed 1 running and evaluating its step 0: the page
    says which run, k of N, the time left from the finished runs' pace, the running run's own
    state, and the table over the finished runs, labelled partial."""
    import time

    from core.jobs.state import Phase, RunState, write_state

    config = ProtocolConfig.from_preset("cpu", methods=["gt", "stm"], seeds=[0, 1])
    folder = runs_root / "protocol-cpu"
    folder.mkdir()
    write_json_atomic(folder / CONFIG_JSON, config.to_dict())
    base = {"mbpp_ppl": ("nll", 1.4, "target"), "arc_challenge": ("acc", 0.25, "ood")}
    end = {"mbpp_ppl": ("nll", 1.2, "target"), "arc_challenge": ("acc", 0.25, "ood")}
    runs = []
    for arm in ("gt", "stm"):
        rid = f"protocol-cpu-{arm}-s0"
        make_run(
            runs_root,
            rid,
            arm,
            2.5 if arm == "stm" else None,
            0.3 if arm == "stm" else None,
            {0: base, 4: end},
            {0: (0.0, None), 4: (0.0, None)},
            seed=0,
        )
        label = "ground truth" if arm == "gt" else "STM τ=2.5"
        runs.append({"arm": arm, "label": label, "seed": 0, "run": rid, "status": "succeeded"})
    running = {"arm": "gt", "label": "ground truth", "seed": 1, "run": "protocol-cpu-gt-s1"}
    partial = write_partial_results(config, folder, [*runs, running], 4)  # (on a cluster: running)
    assert partial["partial"] == {"finished": 2, "planned": 4, "runs": [r["run"] for r in runs]}
    assert "paired" not in partial  # the slow paired comparisons wait for the end
    registry = JobRegistry()
    job = registry.register_foreground(
        "protocol", config.to_dict(), device="cpu", label=config.describe(), run_dir=folder
    )
    write_state(
        folder,
        RunState(
            Phase.PROTOCOL,
            done=2,
            total=4,
            unit="runs",
            detail="ground truth, seed 1",
            time=time.time() - 15,
        ),
    )
    (folder / "progress.txt").write_text(
        "[10:00:00] [3/4] ground truth, seed 1: training (protocol-cpu-gt-s1)\n"
    )
    child = runs_root / "protocol-cpu-gt-s1"
    child.mkdir()
    write_state(
        child,
        RunState(
            Phase.EVALUATING,
            step=0,
            max_steps=4,
            task="mbpp_ppl",
            task_index=0,
            tasks=2,
            done=3,
            total=10,
            unit="items",
            elapsed_s=9.0,
            eta_s=21.0,
            eta_scope="in this task",
        ),
    )
    view = load_protocol(folder)
    assert view.durations() == [60.0, 60.0]
    assert view.eta(RunState(Phase.PROTOCOL, detail="x", time=100.0), now=115.0) == 60.0 + 45.0

    at = AppTest.from_file("../pages/protocol.py", default_timeout=60).run()
    assert not at.exception, [e.value for e in at.exception]
    texts = [p.proto.text for p in at.get("progress")]
    [overall] = [
        t for t in texts if "runs finished" in t and "·" in t and "running" in t and "elapsed" in t
    ]
    assert overall.startswith("2 of 4 runs finished · running ground truth, seed 1 · ")
    # one more run after this one (60 s) and what is left of this one (at most 45 s)
    assert re.search(r"about 1m[0-4]\ds left", overall), overall
    assert "(the finished runs took 1m00s on average)" in overall
    assert any(
        t.startswith("protocol-cpu-gt-s1: evaluating step 0 of 4: mbpp_ppl (task 1 of 2)")
        for t in texts
    )
    assert any("Partial results" in h.value for h in at.subheader)
    assert any("**Partial:** 2 of 4 runs finished" in i.value for i in at.info)
    table = next(d.value for d in at.dataframe if "arm" in d.value.columns).set_index("arm")
    assert list(table.index) == ["ground truth", "STM τ=2.5"]
    assert table.loc["STM τ=2.5", "seeds"] == "1"
    registry.finish(job.id, "cancelled", 143, "cancelled")
    assert (folder / PARTIAL_JSON).is_file()


def test_the_results_caption_counts_the_ood_probe_the_runs_were_compared_on():
    """The caption's "on the base model's own answers to N out-of-domain prompts" comes from the
    results (the cpu protocol's probe has 100), and says no number when the results have none."""
    from core.study.protocol import probe_items

    recorded = protocol_recorded.load_cpu_protocol(app_root() / "docs" / "cpu_protocol.json")
    assert probe_items(recorded) == 100
    assert probe_items(recorded, "text_drift") == 40
    assert probe_items({"paired_base": []}) is None and probe_items({}) is None
