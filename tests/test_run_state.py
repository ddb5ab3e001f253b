"""One source for run state (`core.jobs.state`): the phases a job goes through (preparing data,
evaluating step k, training step k/N, final evaluation, saving, generating), each with a time left
from measured rates, as the job reports them (run_state.json, the status line, the log) and as
the views show them: a progress bar with the line in the shared job header (Train, Generate,
Reproduce), a line of its own in `jobs list` / `jobs show`; only while the job runs (a job that
died leaves its file behind)."""

from __future__ import annotations

import json
import time

import pytest
from streamlit.testing.v1 import AppTest

from components.jobs_view import current_state
from core.cli import main
from core.jobs.metrics import EvalSummaryRecord, StartRecord, TrainRecord
from core.jobs.registry import FAILED, JobRegistry
from core.jobs.runfiles import run_progress
from core.jobs.state import (
    RUN_STATE_JSON,
    Phase,
    RunState,
    StateReporter,
    live_state,
    read_state,
    write_state,
)

NOW = 1_800_000_000.0
EVAL = RunState(
    Phase.EVALUATING,
    step=8,
    max_steps=16,
    task="ood_drift",
    task_index=2,
    tasks=5,
    done=40,
    total=200,
    unit="items",
    elapsed_s=72.0,
    eta_s=170.0,
    eta_scope="in this task",
    time=NOW,
)
LINE = (
    "evaluating step 8 of 16: ood_drift (task 3 of 5) · 40/200 items · 1m12s, about 2m50s "
    "left in this task"
)


class Clock:
    """A hand-driven monotonic clock."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_each_phase_reads_as_its_own_line():
    assert EVAL.line(NOW) == LINE
    assert EVAL.line(NOW + 60) == LINE.replace("about 2m50s", "about 1m50s")  # counts down
    final = RunState(
        Phase.FINAL_EVAL,
        step=16,
        max_steps=16,
        task="mbpp",
        task_index=0,
        tasks=5,
        elapsed_s=5.0,
        time=NOW,
    )
    assert final.line(NOW) == "final evaluation (step 16): mbpp (task 1 of 5) · 5s"
    training = RunState(
        Phase.TRAINING,
        step=5,
        max_steps=16,
        elapsed_s=100.0,
        seconds_per_unit=20.0,
        eta_s=220.0,
        time=NOW,
    )
    assert training.line(NOW) == "training: step 5/16 · 1m40s, about 3m40s left (20s a step)"
    preparing = RunState(
        Phase.PREPARING,
        detail="scoring with the original model",
        done=120,
        total=400,
        unit="examples",
        elapsed_s=60.0,
        eta_s=140.0,
        time=NOW,
    )
    assert preparing.line(NOW) == (
        "preparing data: scoring with the original model · 120/400 examples · 1m00s, "
        "about 2m20s left"
    )
    assert RunState(Phase.SAVING, detail="the final model").line() == "saving: the final model"
    protocol = RunState(
        Phase.PROTOCOL, done=2, total=6, detail="STM τ=2.5, seed 1", eta_s=3000.0, time=NOW
    )
    assert (
        protocol.line(NOW) == "2 of 6 runs finished · running STM τ=2.5, seed 1 · about 50m00s left"
    )


def test_fractions_and_the_file_round_trip(tmp_path):
    assert EVAL.fraction == pytest.approx(0.2)
    assert RunState(Phase.EVALUATING, task="mmlu", task_index=2, tasks=5).fraction == 0.4
    assert RunState(Phase.TRAINING, step=4, max_steps=16).fraction == 0.25
    assert RunState(Phase.GENERATING, done=500, total=400).fraction == 1.0
    write_state(tmp_path, EVAL)
    assert read_state(tmp_path) == EVAL
    saved = json.loads((tmp_path / RUN_STATE_JSON).read_text())
    assert saved["phase"] == "evaluating" and saved["line"] == LINE
    (tmp_path / RUN_STATE_JSON).write_text('{"phase": "dancing"}')
    assert read_state(tmp_path) is None  # an unknown phase is no state


def test_the_training_eta_counts_training_time_only(tmp_path, capsys):
    clock, messages = Clock(), []
    reporter = StateReporter(tmp_path, messages.append, clock=clock)
    reporter("loading model default")
    assert messages[-1] == "preparing data: loading model default"
    reporter.preparing("scoring with the original model", 0, 40, "examples")
    clock.now = 10.0
    reporter.preparing("scoring with the original model", 10, 40, "examples")
    assert reporter.state.eta_s == pytest.approx(30.0)  # 1 s an example, 30 to go
    reporter.training(0, 10)
    assert reporter.state.eta_s is None  # nothing measured yet: no guess
    # the step-0 round takes 100 s: it is not training time
    for done in (0, 5, 10):
        clock.now += 10.0 if done else 0.0
        reporter.evaluating(0, "mbpp", 0, 2, done, 10, max_steps=10)
    assert reporter.state.phase == Phase.EVALUATING
    assert reporter.state.eta_s is None or reporter.state.eta_s == 0.0
    clock.now += 80.0
    reporter.round_ended()
    reporter.training(0, 10)
    clock.now += 40.0
    reporter.training(2, 10)  # 2 steps in 40 s
    state = read_state(tmp_path)
    assert state.phase == Phase.TRAINING and state.seconds_per_unit == pytest.approx(20.0)
    assert state.eta_s == pytest.approx(160.0)  # 8 steps left at 20 s a step
    assert messages[-1] == "training: step 2/10 · 40s, about 2m40s left (20s a step)"
    # a round mid-run, then the final evaluation
    reporter.evaluating(4, "mbpp", 0, 2, 0, 10, max_steps=10)
    clock.now += 4.0
    reporter.evaluating(4, "mbpp", 0, 2, 2, 10, max_steps=10)
    assert messages[-1] == (
        "evaluating step 4 of 10: mbpp (task 1 of 2) · 2/10 items · 4s, about 16s left in this task"
    )
    reporter.round_ended()
    reporter.evaluating(10, "mbpp", 0, 2, 0, 10, max_steps=10, final=True)
    assert read_state(tmp_path).phase == Phase.FINAL_EVAL
    assert messages[-1].startswith("final evaluation (step 10): mbpp (task 1 of 2) · 0/10 items")
    reporter.saving("the final model")
    log = capsys.readouterr().out.splitlines()
    # the log gets every change of phase, task or round, not every step
    assert "preparing data: loading model default" in log
    assert any(line.startswith("evaluating step 0 of 10: mbpp") for line in log)
    assert any(line.startswith("final evaluation (step 10)") for line in log)
    assert log[-1] == "saving: the final model"


def test_run_progress_leaves_evaluation_rounds_out_of_the_eta():
    records = [
        StartRecord(step=0, max_steps=10, time=1000.0),
        EvalSummaryRecord(step=0, seconds=300.0, time=1300.0),  # the step-0 round
        TrainRecord(step=2, loss=1.0, time=1340.0),  # 2 steps in 40 s of training
    ]
    assert run_progress(records).eta_seconds == pytest.approx(160.0)
    dicts = [r.to_dict() for r in records]
    assert run_progress(dicts).eta_seconds == pytest.approx(160.0)  # read back from the file


def test_without_a_job_only_a_recent_state_counts(tmp_path):
    write_state(tmp_path, RunState(Phase.TRAINING, step=1, max_steps=4))
    assert live_state(tmp_path, None).phase == Phase.TRAINING
    assert live_state(tmp_path, "running") is not None
    assert live_state(tmp_path, "failed") is None
    write_state(tmp_path, RunState(Phase.TRAINING, step=1, max_steps=4, time=time.time() - 3600))
    assert live_state(tmp_path, None) is None
    write_state(tmp_path, None)
    assert live_state(tmp_path, None) is None


@pytest.fixture
def running(tmp_path, monkeypatch):
    """A registry with one running training job (this process) evaluating step 8."""
    root = tmp_path / "runs"
    monkeypatch.setenv("PLENS_RUNS_DIR", str(root))
    registry = JobRegistry(root)
    job = registry.register_foreground("train", {"method": "stm"}, device="cpu", label="stm")
    state = RunState(**{**EVAL.__dict__, "time": time.time()})
    write_state(job.run_dir, state)
    registry.set_message(job.id, state.line())
    return registry, job, state


def test_jobs_list_and_show_print_what_the_job_does_now(running, capsys):
    registry, job, state = running
    assert main(["jobs", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    [row] = [i for i, text in enumerate(out) if text.startswith(job.id)]
    assert "evaluating" not in out[row]  # the status message is the same line: printed once
    assert out[row + 1].startswith("    evaluating step 8 of 16: ood_drift (task 3 of 5) · 40/200")
    assert "left in this task" in out[row + 1]
    assert main(["jobs", "show", job.id, "--lines", "1"]) == 0
    assert any(
        line.startswith("evaluating step 8 of 16") for line in capsys.readouterr().out.splitlines()
    )
    assert main(["jobs", "list", "--json"]) == 0
    [listed] = json.loads(capsys.readouterr().out)
    assert listed["state"]["phase"] == "evaluating" and listed["state"]["total"] == 200
    # the job ended: a state file it left behind is not what it does now
    registry.finish(job.id, FAILED, 1, "killed")
    assert main(["jobs", "list"]) == 0
    out = capsys.readouterr().out
    assert job.id in out and "    evaluating" not in out
    assert current_state(job.run_dir, registry.get(job.id)) is None


def _header(registry_root: str, job_id: str) -> None:
    from components.jobs_view import job_header
    from core.jobs.registry import JobRegistry

    registry = JobRegistry(registry_root)
    job_header(registry, registry.get(job_id), resume_note="it continues.")


def test_the_job_header_shows_the_state_as_a_progress_bar(running):
    registry, job, state = running
    at = AppTest.from_function(_header, args=(str(registry.root), job.id), default_timeout=30)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    [bar] = at.get("progress")
    assert bar.proto.value == 20
    assert bar.proto.text.startswith("evaluating step 8 of 16: ood_drift (task 3 of 5) · 40/200")
    [caption] = [c.value for c in at.caption if job.id in c.value]
    assert "evaluating" not in caption  # said once, on the bar
    # training resumes: the same bar says so, with its ETA
    write_state(
        job.run_dir,
        RunState(
            Phase.TRAINING,
            step=9,
            max_steps=16,
            elapsed_s=180.0,
            seconds_per_unit=20.0,
            eta_s=140.0,
        ),
    )
    at.run()
    [bar] = at.get("progress")
    assert bar.proto.value == 56
    assert bar.proto.text == "training: step 9/16 · 3m00s, about 2m20s left (20s a step)"
    write_state(job.run_dir, None)  # no state: the status message is back
    at.run()
    assert not at.get("progress")
    assert any("evaluating step 8" in c.value for c in at.caption)
