"""AppTest smoke tests of the "Reproduce the paper" page: launching a protocol job and showing a
finished protocol's table, findings and report."""

import json

import pytest
from streamlit.testing.v1 import AppTest

from core.io import write_json_atomic
from core.jobs.registry import JobRegistry
from core.jobs.runfiles import CONFIG_JSON
from core.study.protocol import (
    REPORT_HTML,
    RESULTS_JSON,
    ProtocolConfig,
    aggregate,
    write_protocol_report,
)
from tests.test_report import _make_run


@pytest.fixture
def runs_root(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    monkeypatch.setenv("PLENS_RUNS_DIR", str(root))
    root.mkdir()
    return root


def test_empty_page_shows_the_command_and_queues_a_protocol(runs_root):
    registry = JobRegistry()
    # a running foreground job holds the CPU, so the queued protocol waits instead of starting
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
    assert len(queued) == 1 and queued[0].status == "queued"
    assert queued[0].path == runs_root / "protocol-cpu"
    assert queued[0].config["seeds"] == [0, 1]
    assert at.query_params["protocol"] == ["protocol-cpu"] or at.query_params["protocol"] == (
        "protocol-cpu"
    )
    assert any("0 of 10 training runs finished" in str(p.proto) for p in at.get("progress"))
    registry.cancel(queued[0].id)
    registry.finish(blocker.id, "succeeded", 0)


def _finished_protocol(root):
    config = ProtocolConfig.from_preset("cpu", methods=["gt", "stm"], seeds=[0, 1])
    folder = root / "protocol-cpu"
    folder.mkdir()
    write_json_atomic(folder / CONFIG_JSON, config.to_dict())
    runs = []
    for arm, share, forgetting in (("gt", None, (10.0, 10.2)), ("stm", 0.3, (1.0, 1.2))):
        for seed, easy in zip((0, 1), forgetting, strict=True):
            rid = f"protocol-cpu-{arm}-s{seed}"
            base = {"mbpp_ppl": ("nll", 1.4, "target"), "arc_challenge": ("acc", 0.25, "ood")}
            end = {"mbpp_ppl": ("nll", 1.2, "target"), "arc_challenge": ("acc", 0.25, "ood")}
            _make_run(root, rid, arm, 2.5 if arm == "stm" else None, share,
                      {0: base, 4: end}, {0: (0.0, None), 4: (0.0, None)}, seed=seed)  # fmt: skip
            with open(root / rid / "metrics.jsonl", "a") as fh:  # after the half-written line
                fh.write("\n" + json.dumps({"kind": "eval_summary", "step": 4, "bwt": 0.0,
                                            "ti": None, "nll_easy_change": easy}) + "\n")  # fmt: skip
            label = "ground truth" if arm == "gt" else "STM τ=2.5"
            runs.append({"arm": arm, "label": label, "seed": seed, "run": rid,
                         "status": "succeeded"})  # fmt: skip
    results = aggregate(config, runs, ["a note"], 120.0)
    write_protocol_report(results, [r["run"] for r in runs], folder / REPORT_HTML)
    write_json_atomic(folder / RESULTS_JSON, results)
    return results


def test_finished_protocol_shows_table_findings_and_report(runs_root):
    results = _finished_protocol(runs_root)
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
    assert any("4 of 4 training runs finished" in str(p.proto) for p in at.get("progress"))
    [download] = at.get("download_button")
    assert "Download the report" in str(download.proto)


def test_page_says_what_the_recorded_cpu_sweep_found(runs_root, tmp_path, monkeypatch):
    import core.study.protocol as protocol
    from tests.test_protocol import _sweep_row

    rows = [_sweep_row("center", -2.8, 0.7), _sweep_row("lr3e-4", -7.0, -2.1)]
    path = tmp_path / "sweep.json"
    sweep = {"date": "2026-12-02", "machine": "test cpu, 2 cores", "model": "tiny",
             "suite": "protocol", "rows": rows, **protocol.sweep_verdict(rows)}  # fmt: skip
    path.write_text(json.dumps(sweep))
    monkeypatch.setattr(protocol, "CPU_SWEEP_JSON", path)
    at = AppTest.from_file("../pages/protocol.py", default_timeout=60).run()
    assert not at.exception
    assert any(m.value == sweep["text"] for m in at.markdown)
    assert sweep["text"].startswith("Ground truth forgets detectably out of domain in: lr3e-4")
    table = at.dataframe[0].value
    assert list(table["setting"]) == ["center", "lr3e-4"]
    assert table["arc_easy acc"].iloc[1] == "-4.55 [-7.00, -2.10]*"
    monkeypatch.setattr(protocol, "CPU_SWEEP_JSON", tmp_path / "missing.json")
    at = AppTest.from_file("../pages/protocol.py", default_timeout=60).run()
    assert not at.exception and any("No recorded sweep" in c.value for c in at.caption)
