"""The job-view pieces shared by the Train and Generate pages (components/jobs_view.py), on
hand-made jobs and a stand-in registry, driven by AppTest."""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from components.jobs_view import fmt_seconds


def test_fmt_seconds():
    assert fmt_seconds(None) == ""
    assert fmt_seconds(7.9) == "8s"  # under a minute: seconds, rounded (core.fmt.duration)
    assert fmt_seconds(59.6) == "1m00s"
    assert fmt_seconds(187) == "3m07s"
    assert fmt_seconds(3900) == "1h05m"


def _page(run_dir: str) -> None:
    import pandas as pd
    import streamlit as st

    from components.jobs_view import job_header, job_log, job_picker, jobs_table
    from core.jobs.registry import Job

    class Registry:
        """Stand-in: records what the buttons ask for."""

        def cancel(self, job_id: str, wait: bool = True) -> None:
            st.session_state.setdefault("calls", []).append(("cancel", job_id, wait))

        def resume(self, job_id: str) -> None:
            st.session_state.setdefault("calls", []).append(("resume", job_id))

    jobs = [
        Job(
            "job-run",
            "train",
            "stm τ=2.5",
            {"tau": 2.5},
            "cpu",
            "running",
            run_dir,
            2.0,
            message="training",
        ),
        Job("job-bad", "train", "gt", {"method": "gt"}, "cpu", "failed", run_dir, 1.0),
    ]
    registry = Registry()
    jobs_table(
        lambda: jobs,
        lambda js: pd.DataFrame({"job": [j.id for j in js], "status": [j.status for j in js]}),
        state_key="ids",
        empty="No jobs.",
    )
    chosen = job_picker(jobs)
    job = next(j for j in jobs if j.id == chosen)
    job_header(registry, job, key_prefix="t-", resume_note="it continues.")
    job_log(job, lines=2)
    st.write(f"calls: {st.session_state.get('calls', [])}")


@pytest.fixture
def page(tmp_path):
    (tmp_path / "log.txt").write_text("one\ntwo\nthree\n")

    def open_page(**params: str) -> AppTest:
        at = AppTest.from_function(_page, args=(str(tmp_path),), default_timeout=30)
        at.query_params.update(params)
        return at.run()

    return open_page


def test_running_job_shows_badge_log_and_cancel(page):
    at = page()
    assert not at.exception, [e.value for e in at.exception]
    assert at.dataframe[0].value["job"].tolist() == ["job-run", "job-bad"]
    assert at.selectbox[0].value == "job-run" and at.query_params["job"] == "job-run"
    assert any("running" in m.value and "stm τ=2.5" in m.value for m in at.markdown)
    assert [c.value for c in at.code][0] == "two\nthree"  # the last 2 lines of the log
    assert '"tau": 2.5' in at.code[1].value  # config.json
    at.button(key="t-cancel-job-run").click().run()
    assert any("('cancel', 'job-run', False)" in m.value for m in at.markdown)
    assert any("Cancelling job-run" in t.value for t in at.toast)


def test_failed_job_from_the_url_offers_resume(page):
    at = page(job="job-bad")
    assert at.selectbox[0].value == "job-bad"
    assert not [b for b in at.button if b.label == "Cancel"]
    at.button(key="t-resume-job-bad").click().run()
    assert any("job-bad queued again; it continues." in t.value for t in at.toast)
    assert any("('resume', 'job-bad')" in m.value for m in at.markdown)
