"""Pieces of the job views shared by the Train and Generate pages: the status badges, the
polled jobs table, a job's header with its Cancel / Resume action, its log tail and config, and
the job picker that keeps the followed job in the URL (`?job=...`).

The pages keep what differs (which jobs, which columns, the progress they draw); everything here
only reads the job registry (core.jobs) and never blocks: the table polls in a fragment.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import streamlit as st

from core.errors import LensError
from core.fmt import duration
from core.jobs.cluster import (
    BACKENDS,
    DEFAULT_RAY_ADDRESS,
    LOCAL,
    RAY,
    SLURM,
    check_setting,
    current_setting,
    make_setting,
    save_setting,
    saved_setting,
)
from core.jobs.registry import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, Job, JobRegistry
from core.jobs.runfiles import log_tail
from core.jobs.state import RunState, live_state

POLL_SECONDS = 2.0
STATUS_BADGES = {
    QUEUED: ":gray-badge[:material/schedule: queued]",
    RUNNING: ":blue-badge[:material/play_arrow: running]",
    SUCCEEDED: ":green-badge[:material/check: succeeded]",
    FAILED: ":red-badge[:material/error: failed]",
    CANCELLED: ":orange-badge[:material/stop: cancelled]",
}


def current_state(run_dir: str | Path, job: Job | None) -> RunState | None:
    """What the job running in `run_dir` is doing (`core.jobs.state.live_state`): preparing
    data, evaluating step k, training step k/N, the final evaluation, saving, generating, a
    protocol's arms; only while its `job` runs (a job that died leaves the file behind); a run
    without a job row counts only a recent state."""
    return live_state(run_dir, job.status if job is not None else None)


def state_bar(run_dir: str | Path, job: Job | None, *, prefix: str = "") -> RunState | None:
    """A progress bar with the job's state line ("evaluating step 8 of 16: ood_drift (task 3 of
    5) · 40/200 items · 1m12s, about 2m50s left in this task"; "training: step 5/16 · ...,
    about 3m40s left"), `prefix` before it, while the job runs; the state shown, or None."""
    state = current_state(run_dir, job)
    if state is None:
        return None
    st.progress(state.fraction, text=f"{prefix}{state.line()}")
    return state


def job_registry() -> JobRegistry:
    """The job registry; when it cannot be opened (e.g. one an older version wrote, which
    `python -m core migrate` brings up to date), the page says why in one line and stops."""
    try:
        return JobRegistry()
    except LensError as exc:
        st.error(str(exc))
        st.stop()


def old_results_note(runs: Sequence[Any]) -> None:
    """One line naming the runs (`RunView`s) whose evaluation results an older version saved:
    they are shown as saved until `python -m core migrate` rewrites them."""
    old = [run.run_id for run in runs if run.old_format]
    if old:
        st.info(
            f"{', '.join(old)}: evaluation results saved by an older version (the easy-token "
            "NLL as a reference task's score) are shown as saved; `python -m core migrate` "
            "rewrites them.",
            icon=":material/info:",
        )


def fmt_seconds(seconds: float | None) -> str:
    """Durations as "1h05m", "3m07s" or "42s" ("" when unknown): `core.fmt.duration`."""
    return duration(seconds)


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
    registry: JobRegistry,
    job: Job,
    *,
    key_prefix: str = "",
    resume_note: str = "",
    show_state: bool = True,
) -> None:
    """Status badge, label, id and run folder, with Cancel (active job) or Resume (failed or
    cancelled job); `resume_note` says what a resumed job keeps. While the job runs, its state
    (`core.jobs.state`: phase, where in it, time left) as a bar with its line (the status
    message says the same, so the caption leaves it out then); `show_state` False leaves that to
    the page (the protocol draws its own)."""
    head, actions = st.columns([4, 1])
    head.markdown(f"{STATUS_BADGES.get(job.status, job.status)} **{job.label}**")
    where = f" · on {job.where} as `{job.engine_id}`" if job.on_cluster else ""
    state = current_state(job.run_dir, job) if show_state else None
    message = f" · {job.message}" if job.message and state is None and show_state else ""
    head.caption(f"`{job.id}` · run folder `{job.run_dir}`{where}{message}")
    if state is not None:
        head.progress(state.fraction, text=state.line())
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


# --------------------------------------------------------------------------- where jobs run


def backend_caption(registry: JobRegistry) -> None:
    """One line under a page's start button: where a job started now will run."""
    try:
        setting = current_setting(registry.root)
    except LensError as exc:
        st.error(str(exc))
        return
    st.caption(
        f":material/dns: New jobs run on {setting.describe()} (change it on the Start page, "
        "*Where jobs run*)."
    )


def _save_backend(registry: JobRegistry, name: str, address: str | None) -> None:
    """Check the cluster answers, then save the setting; the outcome shows on the next run."""
    try:
        setting = make_setting(name, address)
        check_setting(setting)
        save_setting(registry.root, setting)
        st.session_state["backend-outcome"] = ("ok", f"New jobs now run on {setting.describe()}.")
    except LensError as exc:
        st.session_state["backend-outcome"] = ("error", str(exc))


def backend_panel(registry: JobRegistry) -> None:
    """Pick the job backend (the local queue, a Ray cluster or SLURM), check the cluster
    answers before saving it, and say when the environment overrides the saved choice."""
    import os

    from core.jobs.cluster import ADDRESS_ENV, BACKEND_ENV, PARTITION_ENV

    saved = saved_setting(registry.root)
    labels = {
        LOCAL: "This machine (local queue)",
        RAY: "A Ray cluster (Ray Jobs API)",
        SLURM: "A SLURM cluster (sbatch, through submitit)",
    }
    name = st.radio(
        "Run background jobs on",
        list(BACKENDS),
        index=list(BACKENDS).index(saved.name),
        format_func=labels.get,
        horizontal=True,
        key="backend-name",
    )
    address = None
    if name == RAY:
        address = st.text_input(
            "Ray dashboard address",
            saved.address or DEFAULT_RAY_ADDRESS,
            key="backend-address",
            help="host:port of the head's dashboard (`ray start --head` prints it; 8265 by "
            "default). Run folders must sit on storage every node mounts at the same path "
            "(PLENS_CACHE_DIR / PLENS_RUNS_DIR); see the README.",
        )
    elif name == SLURM:
        address = st.text_input(
            "SLURM partition",
            (saved.address or "") if saved.name == SLURM else "",
            key="backend-partition",
            placeholder="the cluster's default partition",
            help="Jobs are submitted with sbatch from this machine (SLURM's client commands and "
            "its slurm.conf, or $SLURM_CONF, must be here). Run folders must sit on storage "
            "every node mounts at the same path (PLENS_CACHE_DIR / PLENS_RUNS_DIR); see the "
            "README.",
        )
    # a callback, not `if st.button(...)`: a rerun the sidebar asks for cannot swallow the click
    st.button(
        "Check and save",
        key="backend-save",
        icon=":material/save:",
        on_click=_save_backend,
        args=(registry, name, address),
    )
    outcome = st.session_state.pop("backend-outcome", None)
    if outcome:
        (st.success if outcome[0] == "ok" else st.error)(outcome[1])
    if os.environ.get(BACKEND_ENV):
        st.info(
            f"${BACKEND_ENV}={os.environ[BACKEND_ENV]} (and ${ADDRESS_ENV} / ${PARTITION_ENV}) "
            "is set for this app, so it overrides the saved choice."
        )
    try:
        st.caption(f"Now: new jobs run on {current_setting(registry.root).describe()}.")
    except LensError as exc:
        st.error(str(exc))
