"""Background jobs that outlive the browser: a SQLite registry, a process launcher and a queue.

Every long job (training now; evaluation and data generation can reuse it) is a separate OS
process running `python -m core job-run JOB_ID` in its own process group (session), so it keeps
running when the browser reloads, when the page is closed and when the app server restarts.

Layout under the runs root (`$PLENS_RUNS_DIR`, else `<cache_dir()>/runs`):

- `jobs.sqlite`: the registry, one row per job (kind, config, device, status, pid, times, exit
  code, run folder, a one-line status message and the error with the tail of the log).
- `<job id>/`: the job's run folder: `config.json`, `log.txt` (the process's stdout and stderr),
  `metrics.jsonl` (append-only, one JSON object per line, see `append_metric`), plus what the job
  writes itself (for training: `checkpoints/`, `adapter/`, `summary.json`).

Statuses: queued -> running -> succeeded | failed | cancelled (a failed or cancelled job can be
queued again with `resume`; training then continues from its last checkpoint).

Who notices that a job ended, and how the queue moves on (the decision, in one place):

1. The job process itself records its final status (succeeded / failed with the error /
   cancelled) and then starts the next queued job for its device ("chain"). This needs no
   browser and no app: a queue submitted from the CLI drains on its own.
2. A process that dies without reporting (SIGKILL, out-of-memory kill, power loss) cannot chain.
   The process that launched it waits on it in a daemon thread and records the exit code (e.g.
   -9) as failed with the log tail, then starts the next job. If that launcher is gone too, any
   read of the registry (`get`, `list`, the app's polling, `python -m core jobs`) reconciles:
   a running row whose process is gone (pid absent, a zombie, or a different process that reused
   the pid) becomes failed with the tail of its log, and the queue is kicked.

The queue runs at most N jobs per device at once (`max_per_device`, default 1, or
`$PLENS_MAX_JOBS_PER_DEVICE`). Starting jobs happens inside an exclusive SQLite transaction, so
two processes kicking the queue at once never start the same job twice or exceed the limit.

Cancel sends SIGTERM to the job's process group (the job records "cancelled" and exits), waits
a grace period and then sends SIGKILL to the group.

Writes are atomic: JSON files are written to a temp file and renamed; each metrics record is one
`write()` of a whole line followed by fsync, and `read_metrics` skips a half-written last line.

This module is the public face of the job system, `JobRegistry`, composed from:

- `core.jobs.store`: the SQLite job table and the `Job` record;
- `core.jobs.local`: the local launcher (spawn, reap, signals, the per-device queue);
- `core.jobs.reconcile`: cluster jobs (hand-over to a Ray / SLURM engine, reconcile, cancel);
- `core.jobs.jobmain`: the job process (`python -m core job-run ID`, `JOB_KINDS`).

The names callers import from here (statuses, `Job`, `JobError`, `jobs_by_run`, `PROJECT_ROOT`,
`core_process_env`, `run_job_process`, ...) are re-exported from those modules.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from core.config import JobConfig, help_meta
from core.errors import LensError
from core.io import write_json_atomic
from core.jobs import jobmain
from core.jobs.cluster import LOCAL, current_setting
from core.jobs.jobmain import JOB_KINDS, JobCancelled
from core.jobs.local import (
    DEFAULT_GRACE_SECONDS,
    PROJECT_ROOT,
    DeviceSlots,
    LocalLauncher,
    core_process_env,
    max_per_device_default,
    process_alive,
    process_start_time,
    resolve_job_device,
)
from core.jobs.reconcile import ClusterJobs
from core.jobs.runfiles import CONFIG_JSON, runs_dir
from core.jobs.store import (
    CANCELLED,
    FAILED,
    FINAL_STATUSES,
    QUEUED,
    REGISTRY_DB,
    RUNNING,
    STATUSES,
    SUCCEEDED,
    Job,
    JobError,
    JobStore,
    jobs_by_run,
    new_job_id,
)

__all__ = [
    "CANCELLED",
    "DEFAULT_GRACE_SECONDS",
    "FAILED",
    "FINAL_STATUSES",
    "JOB_KINDS",
    "PROJECT_ROOT",
    "QUEUED",
    "REGISTRY_DB",
    "RUNNING",
    "STATUSES",
    "SUCCEEDED",
    "Job",
    "JobCancelled",
    "JobError",
    "JobRegistry",
    "JobsConfig",
    "core_process_env",
    "jobs_by_run",
    "process_alive",
    "resolve_job_device",
    "run_job_process",
]


#: `jobs list`, `jobs show ID` (with the log's last lines), `jobs cancel ID`, `jobs resume ID`.
JOB_ACTIONS = ("list", "show", "cancel", "resume")


@dataclass
class JobsConfig(JobConfig):
    """``python -m core jobs ACTION [JOB_ID]``: list the background jobs, or show, cancel or
    resume one."""

    COMMAND: ClassVar[str] = "jobs"
    LABEL: ClassVar[str] = "jobs"

    action: str = field(
        default="list",
        metadata=help_meta(
            "list every job, or show, cancel or resume JOB_ID",
            positional=True,
            required=True,
            choices=JOB_ACTIONS,
        ),
    )
    job_id: str | None = field(
        default=None, metadata=help_meta("job id (see `jobs list`)", positional=True)
    )
    lines: int = field(default=30, metadata=help_meta("log lines shown by `show`", metavar="LINES"))
    grace: float = field(
        default=DEFAULT_GRACE_SECONDS,
        metadata=help_meta("cancel: seconds before SIGKILL", metavar="GRACE"),
    )
    as_json: bool = field(default=False, metadata=help_meta("machine-readable output", flag="json"))

    def __post_init__(self) -> None:
        if self.action != "list" and not self.job_id:
            raise LensError(
                f"`jobs {self.action}` needs a job id (see `python -m core jobs list`)."
            )


class JobRegistry:
    """The job table in `<root>/jobs.sqlite` plus launching, reconciling and the queue."""

    def __init__(self, root: str | Path | None = None, max_per_device: int | None = None) -> None:
        self.root = Path(root).expanduser() if root else runs_dir()
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / REGISTRY_DB
        self.max_per_device = max_per_device or max_per_device_default()
        self.store = JobStore(self.root)
        self.local = LocalLauncher(self.store)
        self.cluster = ClusterJobs(self.store)

    # -- reading ----------------------------------------------------------------------------

    def get(self, job_id: str, refresh: bool = True) -> Job:
        """One job, after reconciling dead processes and kicking the queue (unless refresh=False)."""
        if refresh:
            self.refresh()
        return self.store.raw(job_id)

    def list(self, limit: int = 200, refresh: bool = True) -> list[Job]:
        """Jobs, newest first (reconciled and with the queue kicked unless refresh=False)."""
        if refresh:
            self.refresh()
        return self.store.rows("ORDER BY created DESC, id DESC LIMIT ?", (int(limit),))

    def refresh(self) -> None:
        """Reconcile dead processes, then start queued jobs on free devices."""
        self.reconcile()
        self.kick()

    def reconcile(self) -> list[str]:
        """Mark running jobs whose process is gone as failed (or cancelled if asked to cancel),
        and cluster jobs their engine has finished with without them recording it.

        Returns the ids that changed. The error holds the tail of the job's log.
        """
        return self.local.reconcile() + self.cluster.reconcile()

    # -- submitting and the queue -----------------------------------------------------------

    def submit(
        self,
        kind: str,
        config: dict[str, Any],
        *,
        device: str = "auto",
        label: str = "",
        start: bool = True,
        run_dir: str | Path | None = None,
        backend: str | None = None,
        address: str | None = None,
    ) -> Job:
        """Queue a job: create its run folder with config.json, add the row, kick the queue.

        `run_dir` names the folder (default: a new one named by the job id); an existing folder
        keeps its config.json, so the job resumes the run there (its kind checks the config).
        `backend` / `address` pick where it runs (default: `core.jobs.cluster.current_setting`);
        a cluster that does not answer is a one-line `ClusterError` before anything is written."""
        job, _ = self._submit(kind, config, device, label, start, run_dir, backend, address, False)
        return job

    def submit_once(
        self,
        kind: str,
        config: dict[str, Any],
        *,
        device: str = "auto",
        label: str = "",
        start: bool = True,
        backend: str | None = None,
        address: str | None = None,
    ) -> tuple[Job, bool]:
        """`submit`, unless a job of this kind with an equal config is already queued or running
        on the same device: then that job, and nothing is written. Returns (job, queued now).

        What a form's button and `--submit` use: two people (or two clicks) sending the same
        form at once get one job, and both see it. The check and the insert happen in one
        exclusive transaction, so the answer holds across processes."""
        return self._submit(kind, config, device, label, start, None, backend, address, True)

    def _submit(
        self,
        kind: str,
        config: dict[str, Any],
        device: str,
        label: str,
        start: bool,
        run_dir: str | Path | None,
        backend: str | None,
        address: str | None,
        once: bool,
    ) -> tuple[Job, bool]:
        if kind not in JOB_KINDS:
            raise JobError(f"Unknown job kind '{kind}' (known: {', '.join(JOB_KINDS)}).")
        setting = current_setting(self.root, backend, address)
        if setting.name != LOCAL:
            self.cluster.engine(setting.name, setting.address).check()
        job_id = new_job_id()
        resolved = resolve_job_device(device)
        with self.store.transaction() as db:
            if once and (twin := self.store.active_twin(db, kind, config, resolved)):
                return twin, False
            run = self._run_folder(job_id, config, run_dir, exist_ok=run_dir is not None)
            self.store.insert_in(
                db,
                id=job_id,
                kind=kind,
                label=label,
                config=config,
                device=resolved,
                status=QUEUED,
                run_dir=str(run),
                created=time.time(),
                backend=setting.name,
                engine_address=setting.address,
            )
        if start:
            self.kick()
        return self.store.raw(job_id), True

    def _run_folder(
        self, job_id: str, config: dict[str, Any], run_dir: str | Path | None, exist_ok: bool
    ) -> Path:
        """A job's run folder: `run_dir`, or a new one named by the job id. An existing folder
        keeps its config.json (the job resumes the run there; its kind checks the config)."""
        run = Path(run_dir).expanduser().absolute() if run_dir else self.root / job_id
        run.mkdir(parents=True, exist_ok=exist_ok)
        if not (run / CONFIG_JSON).exists():
            write_json_atomic(run / CONFIG_JSON, config)
        return run

    def register_foreground(
        self,
        kind: str,
        config: dict[str, Any],
        *,
        device: str = "auto",
        label: str = "",
        run_dir: str | Path | None = None,
    ) -> Job:
        """Record a job this process runs itself (CLI `train`): status running with our pid.

        It bypasses the queue (the user started it explicitly) but counts against its device,
        so queued jobs wait for it. Its process group is the terminal's, so a cancel signals
        only this process, never the group.
        """
        job_id = new_job_id()
        run = self._run_folder(job_id, config, run_dir, exist_ok=True)
        now = time.time()
        me = os.getpid()
        self.store.insert(
            id=job_id,
            kind=kind,
            label=label,
            config=config,
            device=resolve_job_device(device),
            status=RUNNING,
            run_dir=str(run),
            created=now,
            started=now,
            pid=me,
            pid_start=process_start_time(me),
            own_group=0,
            attempts=1,
        )
        return self.store.raw(job_id)

    def kick(self) -> list[str]:
        """Start queued jobs (oldest first) on every device with a free slot; return their ids.

        A cluster job is handed to its engine instead (no per-device cap: the engine queues and
        places it). All of it happens in one exclusive transaction, so two processes kicking at
        once never start a job twice or exceed a device's cap."""
        started: list[str] = []
        with self.store.transaction() as db:
            active = self.store.select(
                db, "WHERE status IN (?, ?) ORDER BY created, id", (QUEUED, RUNNING)
            )
            slots = DeviceSlots(active, self.max_per_device)
            for job in active:
                if job.on_cluster:
                    if job.status == QUEUED and not job.engine_id:
                        if self.cluster.hand_over(db, job):
                            started.append(job.id)
                    continue
                if job.status != QUEUED or (job.holds_device and not slots.free(job.device)):
                    continue
                if self.local.start(db, job, then=self.kick):
                    if job.holds_device:
                        slots.take(job.device)
                    started.append(job.id)
        return started

    # -- called by the job process ----------------------------------------------------------

    def claim(self, job_id: str) -> Job:
        """Called by `job-run` in the job process: make sure the row says running with our pid."""
        return jobmain.claim(self.store, job_id)

    def set_message(self, job_id: str, message: str) -> None:
        """One-line status shown in the jobs list ("scoring 120 examples", "training")."""
        self.store.set_message(job_id, message)

    def finish(self, job_id: str, status: str, exit_code: int, error: str = "") -> None:
        """Record the job's own final status (called by the job process just before it exits)."""
        self.store.finish(job_id, status, exit_code, error)

    # -- user actions -----------------------------------------------------------------------

    def cancel(self, job_id: str, grace: float = DEFAULT_GRACE_SECONDS, wait: bool = True) -> Job:
        """Cancel a job: a queued one at once; a running one with SIGTERM, then SIGKILL.

        With `wait=False` (the app) the escalation runs in a daemon thread and this returns at
        once; the job shows "cancelled" when its process has gone.
        """
        job = self.store.request_cancel(job_id)
        if job.status == QUEUED and not job.engine_id:  # cancelled in the table: nothing runs
            return self.store.raw(job_id)
        if job.on_cluster:
            self.cluster.cancel(job, grace, wait, poll=self.get)
        else:
            self.local.cancel(job, grace, wait, then=self.refresh)
        return self.store.raw(job_id)

    def resume(self, job_id: str) -> Job:
        """Queue a failed or cancelled job again in the same run folder (training continues
        from its last checkpoint)."""
        self.store.requeue(job_id)
        self.kick()
        return self.store.raw(job_id)

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 0.5) -> Job:
        """Block until the job reaches a final status (for the CLI and tests)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job.status in FINAL_STATUSES:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise JobError(f"Job {job_id} is still {job.status} after {timeout:.0f}s.")
            time.sleep(poll)


def run_job_process(job_id: str, registry: JobRegistry | None = None) -> int:
    """Body of `python -m core job-run JOB_ID` (`core.jobs.jobmain.main`): run the job, record
    how it ended, chain the queue.

    Returns the process exit code: 0 succeeded, 2 failed on a user error, 1 on a bug,
    143 cancelled (SIGTERM), 130 interrupted (Ctrl-C in the foreground).
    """
    return jobmain.main(job_id, registry or JobRegistry())
