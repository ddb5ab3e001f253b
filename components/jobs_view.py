"""Pieces of the job views shared by the Train and Generate pages: the status badges, the
polled jobs table, a job's header with its Cancel / Resume action, its log tail and config, and
the job picker that keeps the followed job in the URL (`?job=...`).

The pages keep what differs (which jobs, which columns, the progress they draw); everything here
only reads the job registry (core.jobs) and never blocks: the table polls in a fragment.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import pandas as pd
import streamlit as st

from core.errors import LensError
from core.jobs.registry import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, Job, JobRegistry
from core.jobs.runfiles import log_tail

POLL_SECONDS = 2.0
STATUS_BADGES = {
    QUEUED: ":gray-badge[:material/schedule: queued]",
    RUNNING: ":blue-badge[:material/play_arrow: running]",
    SUCCEEDED: ":green-badge[:material/check: succeeded]",
    FAILED: ":red-badge[:material/error: failed]",
    CANCELLED: ":orange-badge[:material/stop: cancelled]",
}


def fmt_seconds(seconds: float | None) -> str:
    """Durations as "1h05m" or "3m07s" ("" when unknown)."""
    if seconds is None:
        return ""
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


@st.fragment(run_every=POLL_SECONDS)
def jobs_table(
    list_jobs: Callable[[], Sequence[Job]],
    frame: Callable[[Sequence[Job]], pd.DataFrame],
    *,
    state_key: str,
    empty: str,
    column_config: dict[str, Any] | None = None,
) -> None:
    """The jobs `list_jobs()` returns as the table `frame(jobs)` builds, refreshed every few
    seconds; the whole page reruns when the set of jobs changes (its job picker needs them)."""
    jobs = list(list_jobs())
    ids = [j.id for j in jobs]
    if st.session_state.get(state_key) not in (None, ids):
        st.session_state[state_key] = ids
        st.rerun(scope="app")
    st.session_state[state_key] = ids
    if not jobs:
        st.info(empty)
        return
    st.dataframe(frame(jobs), hide_index=True, width="stretch", column_config=column_config)


def _cancel(registry: JobRegistry, job_id: str) -> None:
    try:
        registry.cancel(job_id, wait=False)
        st.toast(f"Cancelling {job_id}…")
    except LensError as exc:
        st.toast(str(exc))


def _resume(registry: JobRegistry, job_id: str, note: str) -> None:
    try:
        registry.resume(job_id)
        st.toast(f"{job_id} queued again; {note}")
    except LensError as exc:
        st.toast(str(exc))


def job_header(
    registry: JobRegistry, job: Job, *, key_prefix: str = "", resume_note: str = ""
) -> None:
    """Status badge, label, id and run folder, with Cancel (active job) or Resume (failed or
    cancelled job); `resume_note` says what a resumed job keeps."""
    head, actions = st.columns([4, 1])
    head.markdown(f"{STATUS_BADGES.get(job.status, job.status)} **{job.label}**")
    head.caption(f"`{job.id}` · run folder `{job.run_dir}` · {job.message}")
    if job.active:
        actions.button(
            "Cancel",
            icon=":material/stop:",
            key=f"{key_prefix}cancel-{job.id}",
            on_click=_cancel,
            args=(registry, job.id),
        )
    elif job.status in (FAILED, CANCELLED):
        actions.button(
            "Resume",
            icon=":material/replay:",
            key=f"{key_prefix}resume-{job.id}",
            on_click=_resume,
            args=(registry, job.id, resume_note),
        )


def job_log(job: Job, *, lines: int = 40) -> None:
    """The last lines of the job's log and its config.json."""
    st.caption(f"Log (last {lines} lines)")
    st.code(log_tail(job.run_dir, lines=lines) or "(empty)", language=None)
    with st.expander("config.json"):
        st.code(json.dumps(job.config, indent=2), language="json")


def job_picker(jobs: Sequence[Job]) -> str | None:
    """A "Job" select box over `jobs` that follows and writes `?job=` (so a reload re-attaches);
    the chosen id, or None without jobs."""
    if not jobs:
        return None
    ids = [j.id for j in jobs]
    labels = {j.id: f"{j.id} · {j.status} · {j.label}" for j in jobs}
    wanted = st.query_params.get("job")
    chosen = st.selectbox(
        "Job", ids, index=ids.index(wanted) if wanted in ids else 0, format_func=labels.get
    )
    st.query_params["job"] = chosen
    return chosen


def watched_job(registry: JobRegistry, job_id: str, state_key: str) -> Job | None:
    """`job_id` fresh from the registry, for a polling fragment (None after its error is shown).
    When the job leaves queued/running, the whole page reruns once, so what sits outside the
    fragment (job lists, the sets a generation job made) catches up."""
    try:
        job = registry.get(job_id)
    except LensError as exc:
        st.error(str(exc))
        return None
    was = st.session_state.get(state_key)
    st.session_state[state_key] = job.status
    if was in (QUEUED, RUNNING) and job.status not in (QUEUED, RUNNING):
        st.rerun(scope="app")
    return job
