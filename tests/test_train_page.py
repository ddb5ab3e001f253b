"""Smoke tests of the Train page (AppTest, tiny model, a 4-example user file): the command it
shows is the one the CLI runs, Start launches a real background job, and a reload (a fresh
session with ?job=ID) re-attaches to it."""

from __future__ import annotations

import shlex
import time
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

from core.cli import build_parser
from core.fmt import num
from core.jobs.registry import SUCCEEDED, JobRegistry
from core.jobs.runfiles import read_metrics
from core.training.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "tests" / "data" / "sample.jsonl"


@pytest.fixture
def page(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PLENS_RUNS_DIR", str(tmp_path / "runs"))

    def open_page(**params: str) -> AppTest:
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
        at.query_params.update(
            model=str(tiny_model_dir),
            device="cpu",
            kind="file",
            data=str(DATA),
            limit="4",
            **params,
        )
        at.run()
        at.switch_page("pages/train.py")
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    return open_page


def command(at: AppTest) -> str:
    [code] = [c.value for c in at.code if c.value.startswith("python -m core train")]
    return code


def test_form_shows_the_command_the_cli_runs(page, tiny_model_dir):
    at = page()
    cmd = command(at)
    config = TrainConfig.from_args(build_parser().parse_args(shlex.split(cmd)[3:]))
    assert config.model == str(tiny_model_dir) and config.data == str(DATA)
    assert (config.method, config.id_col, config.limit) == ("gt", "id", 4)
    at.selectbox(key="train_method").set_value("stm").run()
    at.selectbox(key="train_preset").set_value("cpu-quick").run()
    at.number_input(key="steps-cpu-quick").set_value(3).run()
    cmd = command(at)
    config = TrainConfig.from_args(build_parser().parse_args(shlex.split(cmd)[3:]))
    assert (config.preset, config.method, config.tau, config.max_steps) == (
        "cpu-quick",
        "stm",
        2.5,
        3,
    )
    assert "--method stm" in cmd and "--max-steps 3" in cmd
    at.radio(key="train_data_kind").set_value("path").run()
    at.text_input(key="data_path").input("/no/such/folder").run()
    assert any("Not found: /no/such/folder" in e.value for e in at.error)
    assert not [c for c in at.code if c.value.startswith("python -m core train")]


def test_start_runs_a_job_and_a_reload_reattaches(page, tmp_path):
    at = page()
    assert at.selectbox(key="train_preset").value == "cpu-quick"  # the device is the CPU
    at.number_input(key="steps-cpu-quick").set_value(2).run()
    at.number_input(key="len-cpu-quick").set_value(48).run()
    at.number_input(key="bs-cpu-quick").set_value(2).run()
    [start] = [b for b in at.button if b.label == "Start training"]
    start.click().run()
    job_id = at.query_params["job"]
    registry = JobRegistry(tmp_path / "runs")
    deadline = time.time() + 180
    while registry.get(job_id).status in ("queued", "running"):
        assert time.time() < deadline, registry.get(job_id).message
        time.sleep(0.5)
    assert registry.get(job_id).status == SUCCEEDED, registry.get(job_id).error

    reloaded = page(job=job_id)  # a new session, as after a browser reload
    assert reloaded.query_params["job"] == job_id
    [picker] = [s for s in reloaded.selectbox if s.label == "Job"]
    assert picker.value == job_id
    table = reloaded.dataframe[0].value
    assert table["job"].tolist() == [job_id]
    assert table["step"].tolist() == ["2/2"] and table["progress"].tolist() == [1.0]
    [*_, last] = [r for r in read_metrics(registry.get(job_id).run_dir) if r["kind"] == "train"]
    assert table["loss"].tolist() == [num(last["loss"], 4)]  # the one number rule, not "None"
    assert any("succeeded" in m.value for m in reloaded.markdown)
    assert any("loss" in s.value and "Done in" in s.value for s in reloaded.success)
    log = next(c.value for c in reloaded.code if "step 2/2" in c.value)
    assert "done: step 2" in log


def test_unknown_job_in_the_url_is_a_clear_message(page):
    at = page(job="20990101-000000-dead")
    assert any("20990101-000000-dead is not in" in w.value for w in at.warning)


def test_a_malformed_tau_in_the_url_is_a_warning_not_a_traceback(page):
    at = page(tau="abc")
    at.selectbox(key="train_method").set_value("stm").run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("Ignored ?tau=abc" in w.value for w in at.warning)
    config = TrainConfig.from_args(build_parser().parse_args(shlex.split(command(at))[3:]))
    assert config.method == "stm" and config.tau == 2.5


def test_a_running_job_shows_one_progress_bar(page, tmp_path):
    """While a job reports its state, the job view shows that state's bar once: not a second
    "step k of N" bar beside it."""
    from core.jobs.state import Phase, RunState, StateReporter

    registry = JobRegistry(tmp_path / "runs")
    job = registry.register_foreground("train", {"method": "gt"}, device="cpu", label="running")
    try:
        StateReporter(job.path).report(RunState(Phase.TRAINING, step=3, max_steps=8))
        at = page(job=job.id)
        bars = at.get("progress")
        assert len(bars) == 1, [b.proto.text for b in bars]
        assert "step 3/8" in bars[0].proto.text
    finally:
        registry.finish(job.id, "succeeded", 0)
