"""The τ sweep: one plan (`core.study.sweep`) behind the Compare page's form and `python -m core
sweep`; every run is a train job of the registry, like a run from the Train page."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.cli import main
from core.errors import LensError
from core.jobs.registry import JobRegistry
from core.study.sweep import SweepConfig, submit_sweep

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A registry whose CPU is held by a running foreground job, so what a sweep queues waits
    (nothing trains in these tests); the blocker ends with the test."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PLENS_RUNS_DIR", str(tmp_path / "runs"))
    reg = JobRegistry()
    blocker = reg.register_foreground("train", {"method": "gt"}, device="cpu")
    yield reg
    for job in reg.list():
        if job.active and job.id != blocker.id:
            reg.cancel(job.id)
    reg.finish(blocker.id, "succeeded", 0)


def _plan(jobs) -> list[tuple[str, float | None, int]]:
    return [
        (
            j.config["method"],
            j.config["tau"] if j.config["method"] != "gt" else None,
            j.config["seed"],
        )
        for j in jobs
    ]


def test_a_sweep_plans_ground_truth_each_tau_and_the_control_per_seed():
    config = SweepConfig(taus=[1.5, 3.0], seeds=[0, 1], limit=16)
    runs = config.runs()
    assert [(r.method, r.tau if r.method != "gt" else None, r.seed) for r in runs] == [
        ("gt", None, 0),
        ("stm", 1.5, 0),
        ("stm", 3.0, 0),
        ("random", 2.5, 0),
        ("gt", None, 1),
        ("stm", 1.5, 1),
        ("stm", 3.0, 1),
        ("random", 2.5, 1),
    ]
    assert {(r.task, r.limit, r.preset) for r in runs} == {("mbpp", 16, "cpu-quick")}
    assert "8 runs on mbpp" in config.describe()


@pytest.mark.parametrize(
    "values, reason",
    [
        ({"taus": [0.0]}, "positive"),
        ({"taus": [2.0, 2.0]}, "twice"),
        ({"taus": [], "ground_truth": False, "random_control": False}, "at least one"),
        ({"seeds": []}, "seed"),
        ({"task": "nope"}, "Unknown task 'nope'"),
        ({"train_preset": "huge"}, "Unknown preset"),
    ],
)
def test_bad_sweeps_are_one_line_errors(values, reason):
    with pytest.raises(LensError, match=reason):
        SweepConfig(**values)


def test_submit_queues_every_run_as_a_train_job(registry):
    jobs = submit_sweep(SweepConfig(taus=[2.0], seeds=[3], limit=4), registry)
    assert _plan(jobs) == [("gt", None, 3), ("stm", 2.0, 3), ("random", 2.5, 3)]
    listed = {j.id: j for j in registry.list()}
    assert all(listed[j.id].kind == "train" and listed[j.id].status == "queued" for j in jobs)
    assert all(Path(j.run_dir).parent == registry.root for j in jobs)  # ordinary run folders


def test_cli_sweep_queues_and_prints_the_jobs(registry, capsys):
    assert main(["sweep", "--taus", "2,3", "--no-random-control", "--limit", "4"]) == 0
    out = capsys.readouterr()
    ids = [line.split("\t")[0] for line in out.out.splitlines()]
    queued = [j for j in registry.list() if j.id in ids]
    assert _plan(sorted(queued, key=lambda j: ids.index(j.id))) == [
        ("gt", None, 0),
        ("stm", 2.0, 0),
        ("stm", 3.0, 0),
    ]
    assert "τ sweep: 3 runs on mbpp" in out.err
    # bad input: one line, exit 2, no job
    before = len(registry.list())
    assert main(["sweep", "--taus", "2,x"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    assert len(registry.list()) == before


def test_the_compare_page_queues_the_sweep_and_shows_its_command(registry):
    at = AppTest.from_file("../pages/compare.py", default_timeout=60).run()
    assert not at.exception
    taus = next(t for t in at.text_input if t.label == "τ values")
    taus.set_value("2, x")
    next(b for b in at.button if b.label == "Queue sweep").click().run()
    assert any("float" in e.value for e in at.error)  # a message, no job
    assert [j.kind for j in registry.list()] == ["train"]  # only the blocker
    taus = next(t for t in at.text_input if t.label == "τ values")
    taus.set_value("2, 4")
    next(b for b in at.button if b.label == "Queue sweep").click().run()
    assert not at.exception and not at.error
    queued = [j for j in registry.list() if j.status == "queued"]
    assert sorted(_plan(queued), key=str) == sorted(
        [("gt", None, 0), ("stm", 2.0, 0), ("stm", 4.0, 0), ("random", 2.5, 0)], key=str
    )
    assert any(
        c.value.startswith("python -m core sweep") and "--taus 2.0,4.0" in c.value for c in at.code
    )
