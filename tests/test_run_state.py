"""An evaluation round in progress (`eval_progress.json`, written by
`core.eval.runner.RoundProgress`) as the job views show it: a progress bar with the round's line
in the shared job header (Train, Generate), and a line of its own in `jobs list` / `jobs show`;
only while the job runs (a job that died mid-round leaves the file behind)."""

from __future__ import annotations

import json
import time

import pytest
from streamlit.testing.v1 import AppTest

from components.jobs_view import current_eval_progress, eval_progress_fraction
from core.cli import main
from core.jobs.registry import FAILED, JobRegistry
from core.jobs.runfiles import write_eval_progress

LINE = ("evaluating step 8: ood_drift (task 3 of 5) · 40/200 items · 1m12s, about 2m50s left "
        "in this task")  # fmt: skip


def progress(**overrides) -> dict:
    return {"step": 8, "task": "ood_drift", "task_index": 2, "tasks": 5, "items_done": 40,
            "items": 200, "elapsed_s": 72.0, "time": time.time(), "line": LINE, **overrides}  # fmt: skip


@pytest.fixture
def running(tmp_path, monkeypatch):
    """A registry with one running training job (this process) evaluating step 8."""
    root = tmp_path / "runs"
    monkeypatch.setenv("PLENS_RUNS_DIR", str(root))
    registry = JobRegistry(root)
    job = registry.register_foreground("train", {"method": "stm"}, device="cpu", label="stm")
    write_eval_progress(job.run_dir, progress())
    registry.set_message(job.id, LINE)
    return registry, job


def test_the_fraction_counts_items_else_tasks():
    assert eval_progress_fraction(progress()) == pytest.approx(0.2)
    assert eval_progress_fraction(progress(items=0, items_done=0)) == pytest.approx(2 / 5)
    assert eval_progress_fraction(progress(items=0, tasks=0)) == 0.0
    assert eval_progress_fraction(progress(items_done=250)) == 1.0


def test_jobs_list_and_show_print_the_round_in_progress(running, capsys):
    registry, job = running
    assert main(["jobs", "list"]) == 0
    out = capsys.readouterr().out.splitlines()
    [row] = [i for i, text in enumerate(out) if text.startswith(job.id)]
    assert LINE not in out[row]  # the status message is the same line: printed once, below
    assert out[row + 1] == f"    {LINE}"
    assert main(["jobs", "show", job.id, "--lines", "1"]) == 0
    assert LINE in capsys.readouterr().out.splitlines()
    assert main(["jobs", "list", "--json"]) == 0
    [listed] = json.loads(capsys.readouterr().out)
    assert listed["eval_progress"]["line"] == LINE and listed["eval_progress"]["items"] == 200
    # the job ended: a progress file it left behind is not a round in progress
    registry.finish(job.id, FAILED, 1, "killed")
    assert main(["jobs", "list"]) == 0
    out = capsys.readouterr().out
    assert job.id in out and f"    {LINE}" not in out
    assert current_eval_progress(job.run_dir, registry.get(job.id)) is None


def test_without_a_job_only_a_recent_progress_file_counts(tmp_path):
    write_eval_progress(tmp_path, progress())
    assert current_eval_progress(tmp_path, None)["line"] == LINE
    write_eval_progress(tmp_path, progress(time=time.time() - 3600))
    assert current_eval_progress(tmp_path, None) is None
    write_eval_progress(tmp_path, None)
    assert current_eval_progress(tmp_path, None) is None


def _header(registry_root: str, job_id: str) -> None:
    from components.jobs_view import job_header
    from core.jobs.registry import JobRegistry

    registry = JobRegistry(registry_root)
    job_header(registry, registry.get(job_id), resume_note="it continues.")


def test_the_job_header_shows_the_round_as_a_progress_bar(running):
    registry, job = running
    at = AppTest.from_function(_header, args=(str(registry.root), job.id), default_timeout=30)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    [bar] = at.get("progress")
    assert bar.proto.value == 20 and bar.proto.text == LINE
    [caption] = [c.value for c in at.caption if job.id in c.value]
    assert LINE not in caption  # said once, on the bar
    write_eval_progress(job.run_dir, None)  # the round ended: the status message is back
    at.run()
    assert not at.get("progress")
    assert any(LINE in c.value for c in at.caption)
