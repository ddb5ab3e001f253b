"""The job system with real job processes (tiny model, a few steps): a queue that drains on its
own after the launcher exits, SIGKILL -> failed with the log tail, resume to the same final
step, cancel, and metrics files that survive half-written lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from core.jobs.registry import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, JobError, JobRegistry
from core.jobs.runfiles import append_metric, read_metrics, run_progress
from core.jobs.state import Phase, read_state
from tests.job_fixtures import train_config

ROOT = Path(__file__).resolve().parents[1]
ROWS = [
    {"prompt": "Square a number.", "response": "def square(x):\n    return x * x"},
    {"prompt": "What is 7 times 8?", "response": "7 times 8 is 56."},
    {"prompt": "Capital of France?", "response": "The capital of France is Paris."},
    {"prompt": "Add two numbers.", "response": "def add(a, b):\n    return a + b"},
]


@pytest.fixture
def runs(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    monkeypatch.setenv("PLENS_RUNS_DIR", str(root))
    return root


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS), encoding="utf-8")
    return path


def cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m core ...` in a separate process that exits when the command returns."""
    return subprocess.run(
        [sys.executable, "-m", "core", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )


def wait_until(predicate, timeout: float = 180, poll: float = 0.3):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError("timed out waiting")


def test_metrics_reader_tolerates_a_half_written_last_line(tmp_path):
    append_metric(tmp_path, {"kind": "train", "step": 1, "loss": 2.0})
    append_metric(tmp_path, {"kind": "train", "step": 2, "loss": 1.5})
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "train", "step": 3, "lo')  # a writer died mid-line
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    append_metric(tmp_path, {"kind": "done", "step": 4})  # starts on a fresh line
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 4]
    assert read_metrics(tmp_path / "missing") == []


def test_progress_and_eta_from_metrics():
    records = [
        {"kind": "start", "step": 0, "max_steps": 10, "time": 100.0},
        {"kind": "train", "step": 2, "time": 110.0, "loss": 3.0},
        {"kind": "train", "step": 4, "time": 120.0, "loss": 2.5},
    ]
    prog = run_progress(records)
    assert (prog.step, prog.max_steps, prog.last_loss) == (4, 10, 2.5)
    assert prog.fraction == pytest.approx(0.4)
    assert prog.eta_seconds == pytest.approx(30.0)  # 5 s per step, 6 steps left
    # after a resume the pace is measured from the new start
    records += [{"kind": "start", "step": 4, "max_steps": 10, "time": 500.0}]
    records += [{"kind": "train", "step": 5, "time": 502.0, "loss": 2.4}]
    assert run_progress(records).eta_seconds == pytest.approx(10.0)
    assert run_progress(records + [{"kind": "done", "step": 10}]).fraction == 1.0


def test_queue_runs_jobs_one_after_another_without_the_launcher(runs, tiny_model_dir, data_file):
    # Submit from short-lived CLI processes: they exit at once, as a closed app would.
    ids = []
    for seed in (0, 1, 1):  # the same config again is the job already queued, not a second
        config = write(runs, train_config(tiny_model_dir, data_file, seed=seed))
        done = cli("train", "--submit", "--config", str(config))
        assert done.returncode == 0, done.stderr
        ids.append(done.stdout.strip())
    assert ids[2] == ids[1] and "not queued again" in done.stderr
    ids = ids[:2]
    registry = JobRegistry(runs)
    third = registry.submit("train", train_config(tiny_model_dir, data_file, seed=2), device="cpu")
    assert registry.get(third.id).status == QUEUED
    assert registry.cancel(third.id).status == CANCELLED  # a queued job is cancelled at once

    def finished():
        jobs = [JobRegistry(runs).get(i) for i in ids]  # a fresh registry, as after a restart
        return jobs if all(j.status in (SUCCEEDED, FAILED) for j in jobs) else None

    first, second = wait_until(finished)
    assert first.status == SUCCEEDED and second.status == SUCCEEDED, second.error or first.error
    assert first.exit_code == 0 and second.exit_code == 0
    assert second.started >= first.finished - 0.5  # one after the other (1 per device)
    for job in (first, second):
        run = Path(job.run_dir)
        assert json.loads((run / "config.json").read_text())["max_steps"] == 2
        assert json.loads((run / "summary.json").read_text())["final_step"] == 2
        assert (run / "adapter" / "adapter_config.json").is_file()
        records = read_metrics(run)
        assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]
        assert records[-1]["kind"] == "done"
        log = (run / "log.txt").read_text()
        assert "step 2/2" in log
        # the job's states, each logged as it began: preparing data, training, saving
        assert "preparing data: loading model" in log and "\ntraining: step 0/2\n" in log
        assert "saving: the final model" in log
        assert read_state(run).phase == Phase.SAVING  # the last state the job reported
    assert registry.get(third.id).status == CANCELLED and registry.get(third.id).pid is None
    listed = cli("jobs", "list", "--json")
    assert {j["id"]: j["status"] for j in json.loads(listed.stdout)} == {
        ids[0]: SUCCEEDED,
        ids[1]: SUCCEEDED,
        third.id: CANCELLED,
    }


def write(folder: Path, config: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"cfg-{time.time_ns()}.json"
    path.write_text(json.dumps(config))
    return path


def test_sigkill_marks_failed_with_log_tail_and_resume_reaches_the_same_step(
    runs, tiny_model_dir, data_file
):
    config = train_config(tiny_model_dir, data_file, max_steps=8, save_every=2)
    done = cli("train", "--submit", "--config", str(write(runs, config)))
    job_id = done.stdout.strip()
    registry = JobRegistry(runs)
    job = registry.get(job_id)
    wait_until(
        lambda: any(r["kind"] == "checkpoint" and r["step"] >= 2 for r in read_metrics(job.run_dir))
    )
    job = registry.get(job_id)
    assert job.status == RUNNING
    os.killpg(job.pid, signal.SIGKILL)
    failed = wait_until(lambda: (j := registry.get(job_id)).status == FAILED and j)
    assert "ended without reporting" in failed.error
    assert "step 2/8" in failed.error  # the tail of its log
    killed_at = max(r["step"] for r in read_metrics(job.run_dir) if r["kind"] == "train")
    assert killed_at < 8

    registry.resume(job_id)
    resumed = wait_until(lambda: (j := registry.get(job_id)).status in (SUCCEEDED, FAILED) and j)
    assert resumed.status == SUCCEEDED, resumed.error
    assert resumed.attempts == 2
    summary = json.loads((Path(job.run_dir) / "summary.json").read_text())
    assert summary["final_step"] == 8
    assert summary["resumed_from"].startswith("checkpoint-")
    starts = [r for r in read_metrics(job.run_dir) if r["kind"] == "start"]
    assert starts[0]["step"] == 0 and starts[-1]["step"] >= 2
    assert starts[-1]["max_steps"] == 8


def test_cancel_stops_a_running_job(runs, tiny_model_dir, data_file):
    registry = JobRegistry(runs)
    job = registry.submit(
        "train", train_config(tiny_model_dir, data_file, max_steps=500), device="cpu"
    )
    wait_until(lambda: any(r["kind"] == "train" for r in read_metrics(job.run_dir)))
    cancelled = registry.cancel(job.id, grace=30)
    assert cancelled.status == CANCELLED
    assert cancelled.exit_code == 128 + signal.SIGTERM  # it stopped itself on SIGTERM
    assert "job cancelled" in (Path(job.run_dir) / "log.txt").read_text()
    with pytest.raises(JobError, match="already cancelled"):
        registry.cancel(job.id)


def test_unknown_job_and_bad_resume_are_one_line_errors(runs):
    registry = JobRegistry(runs)
    with pytest.raises(JobError, match="No job"):
        registry.get("nope")
    done = cli("jobs", "cancel", "nope")
    assert done.returncode == 2 and done.stderr.startswith("error: No job 'nope'")


def test_the_same_form_sent_at_once_from_many_places_queues_one_job(runs):
    """Eight submitters (threads, each with its own registry connection, as two browsers or a
    browser and a terminal are) send the same config at the same moment: one job, and every
    submitter is handed it. A different config, or the same one after the job ended, queues."""
    import threading

    config = {"model": "default", "task": "mbpp", "max_steps": 2, "seed": 0}
    barrier = threading.Barrier(8, timeout=120)
    answers: list[tuple[str, bool]] = []
    # Each submitter's own connection, opened before the race (a thread that failed to open
    # one would leave the others waiting at the barrier); the race is the submit itself.
    registries = [JobRegistry(runs) for _ in range(8)]

    def send(registry: JobRegistry) -> None:
        barrier.wait()
        job, new = registry.submit_once(
            "train", config, device="cpu", label="same form", start=False
        )
        answers.append((job.id, new))

    threads = [threading.Thread(target=send, args=(r,)) for r in registries]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    registry = JobRegistry(runs)
    jobs = registry.list(refresh=False)
    assert len(jobs) == 1, [j.id for j in jobs]
    assert {job_id for job_id, _ in answers} == {jobs[0].id}
    assert sum(new for _, new in answers) == 1
    assert sorted(p.name for p in runs.iterdir() if p.is_dir()) == [jobs[0].id]  # no stray folder

    other, new = registry.submit_once("train", {**config, "seed": 1}, device="cpu", start=False)
    assert new and other.id != jobs[0].id
    registry.store.finish(jobs[0].id, CANCELLED, 1)
    again, new = registry.submit_once("train", config, device="cpu", start=False)
    assert new and again.id not in (jobs[0].id, other.id)


def test_many_places_opening_a_new_registry_at_once_all_get_it(tmp_path):
    """Two browsers and a terminal opening the job table of a fresh runs folder at the same
    moment: every one opens it (SQLite refused the switch to WAL to one or two of eight, without
    waiting, within 150 tries every time) and the table is in WAL mode."""
    import threading

    failures: list[str] = []
    for trial in range(150):
        root = tmp_path / f"runs{trial}"
        barrier = threading.Barrier(8, timeout=60)

        def open_it(root: Path = root, barrier: threading.Barrier = barrier) -> None:
            barrier.wait()
            try:
                JobRegistry(root)
            except Exception as exc:  # noqa: BLE001 - the test reports any failure to open
                failures.append(f"{root.name}: {exc!r}")

        threads = [threading.Thread(target=open_it) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures, failures
        with JobRegistry(root).store.connect() as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
