"""The local launcher: one OS process per job, in a session (process group) of its own, a queue
per device, and the signals that cancel a job.

A local job is `python -m core job-run JOB_ID` started in a new session with its output appended
to the run folder's log.txt, so it keeps running when the browser reloads, when the page is
closed and when the app server restarts.

Who notices that a local job ended (the job process records its own end; see
`core.jobs.registry` for the whole decision): a process that dies without reporting is waited on
by the process that launched it (`LocalLauncher.reap`, a daemon thread that records the exit
code), and, if that launcher is gone too, by any later reconcile (`LocalLauncher.reconcile`: a
running row whose process is gone, a zombie, or a different process that reused the pid).

The queue runs at most N jobs per device at once (`DeviceSlots`; N is `max_per_device`, default
1, or `$PLENS_MAX_JOBS_PER_DEVICE`); a coordinator job (a protocol, which queues its runs and
waits for them: `Job.holds_device`) takes no slot. Cancel sends SIGTERM to the job's process group (the job
records "cancelled" and exits), waits a grace period and then sends SIGKILL to the group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import psutil

from core.errors import LensError
from core.jobs.engine import JOB_ENV_DEFAULTS
from core.jobs.runfiles import LOG_TXT
from core.jobs.store import FAILED, RUNNING, Job, JobError, JobStore

DEFAULT_GRACE_SECONDS = 10.0
PROJECT_ROOT = Path(__file__).resolve().parents[2]

# Pids of jobs this process launched and is waiting on (see `LocalLauncher.reap`).
REAPING: set[int] = set()


def core_process_env() -> dict[str, str]:
    """This process's environment for a child `python -m core ...`: unbuffered output, and the
    project on PYTHONPATH so the child imports the same code from any working folder."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p
    )
    return env


def process_start_time(pid: int) -> float | None:
    """Start time of a live, non-zombie process, or None if there is none with that pid."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc.create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
        return None


def process_alive(pid: int | None, pid_start: float | None) -> bool:
    """True if `pid` is a live process started at `pid_start` (guards against pid reuse)."""
    if not pid:
        return False
    started = process_start_time(pid)
    if started is None:
        return False
    return pid_start is None or abs(started - pid_start) < 1.0


def describe_exit(code: int | None) -> str:
    """Why a job ended that did not record it, from its exit code (None: not known)."""
    if code is None:
        return "the process ended without reporting a result (killed or crashed)"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the process was killed by {name}"
    return f"the process exited with code {code} without reporting a result"


def max_per_device_default() -> int:
    """`$PLENS_MAX_JOBS_PER_DEVICE` (default 1), checked."""
    raw = os.environ.get("PLENS_MAX_JOBS_PER_DEVICE", "1")
    try:
        value = int(raw)
    except ValueError:
        raise JobError(f"PLENS_MAX_JOBS_PER_DEVICE must be an integer, got {raw!r}.") from None
    if value < 1:
        raise JobError(f"PLENS_MAX_JOBS_PER_DEVICE must be at least 1, got {value}.")
    return value


def resolve_job_device(device: str) -> str:
    """The device a job is queued on: "auto" becomes cuda / mps / cpu as available."""
    if device != "auto":
        return device
    from core.model.loading import resolve_device  # lazy: heavy optional (imports torch)

    return resolve_device("auto").type


class DeviceSlots:
    """The per-device queue's count: local jobs running on each device, against the cap."""

    def __init__(self, active: list[Job], cap: int) -> None:
        self.cap = cap
        self.running: dict[str, int] = {}
        for job in active:
            if job.status == RUNNING and job.holds_device:
                self.take(job.device)

    def free(self, device: str) -> bool:
        """A job could start on `device` now."""
        return self.running.get(device, 0) < self.cap

    def take(self, device: str) -> None:
        """Count one more job running on `device`."""
        self.running[device] = self.running.get(device, 0) + 1


class LocalLauncher:
    """Starts, reaps, reconciles and signals the local job processes of one job table."""

    def __init__(self, store: JobStore) -> None:
        self.store = store

    # -- starting ---------------------------------------------------------------------------

    def start(self, db: sqlite3.Connection, job: Job, then: Callable[[], object]) -> bool:
        """Launch a queued job (inside the queue's transaction `db`) and mark it running, with a
        reaper thread that calls `then` (the queue's kick) once it exits. A launch that fails
        marks the job failed; returns whether it started."""
        try:
            proc = self.launch(job)
        except JobError as exc:
            self.store.update(db, job.id, status=FAILED, finished=time.time(), error=str(exc))
            return False
        self.store.update(
            db,
            job.id,
            status=RUNNING,
            started=time.time(),
            finished=None,
            pid=proc.pid,
            pid_start=process_start_time(proc.pid),
            own_group=1,
            exit_code=None,
            error="",
            message="starting",
            attempts=job.attempts + 1,
        )
        REAPING.add(proc.pid)
        threading.Thread(
            target=self.reap, args=(job.id, proc, then), daemon=True, name=f"reap-{job.id}"
        ).start()
        return True

    def launch(self, job: Job) -> subprocess.Popen:
        """Start `python -m core job-run ID` in a new session, output appended to log.txt."""
        env = {**JOB_ENV_DEFAULTS, **core_process_env(), "PLENS_RUNS_DIR": str(self.store.root)}
        run = Path(job.run_dir)
        run.mkdir(parents=True, exist_ok=True)
        with open(run / LOG_TXT, "ab") as log:
            stamp = datetime.now().isoformat(timespec="seconds")
            log.write(f"[{stamp}] starting job {job.id} (attempt {job.attempts + 1})\n".encode())
            log.flush()
            try:
                return subprocess.Popen(
                    [sys.executable, "-m", "core", "job-run", job.id],
                    cwd=PROJECT_ROOT,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as exc:
                raise JobError(f"Could not start job {job.id}: {exc}") from None

    # -- noticing the end -------------------------------------------------------------------

    def reap(self, job_id: str, proc: subprocess.Popen, then: Callable[[], object]) -> None:
        """Wait for a launched job; if it died without reporting, record that. Then `then`."""
        code = proc.wait()
        try:
            self.finish_if_running(job_id, proc.pid, exit_code=code)
            then()
        except (sqlite3.Error, LensError):  # registry gone (a test's temp folder) or launch failed
            pass
        finally:
            REAPING.discard(proc.pid)

    def finish_if_running(self, job_id: str, pid: int | None, exit_code: int | None) -> bool:
        """Record the end of a job that did not report it itself (still 'running' with `pid`)."""
        with self.store.transaction() as db:
            jobs = self.store.select(db, "WHERE id = ?", (job_id,))
            if not jobs or jobs[0].status != RUNNING or jobs[0].pid != pid:
                return False
            self.store.record_unreported_end(db, jobs[0], describe_exit(exit_code), exit_code)
        return True

    def reconcile(self) -> list[str]:
        """Mark running local jobs whose process is gone as failed (or cancelled if asked to
        cancel); the ids that changed."""
        running = self.store.rows("WHERE status = ?", (RUNNING,))
        # Children of this process are left to their reaper thread, which knows the exit code.
        dead = [
            j
            for j in running
            if not j.on_cluster and j.pid not in REAPING and not process_alive(j.pid, j.pid_start)
        ]
        changed = []
        for job in dead:
            if self.finish_if_running(job.id, job.pid, exit_code=None):
                changed.append(job.id)
        return changed

    # -- cancelling -------------------------------------------------------------------------

    def cancel(self, job: Job, grace: float, wait: bool, then: Callable[[], object]) -> None:
        """SIGTERM to a running job, SIGKILL after `grace` seconds if it is still there, then
        `then` (the registry's refresh). With `wait=False` the escalation runs in a daemon
        thread and this returns at once."""
        self.signal(job, signal.SIGTERM)
        if wait:
            self.escalate(job, grace)
            then()
        else:
            threading.Thread(
                target=self._escalate_then, args=(job, grace, then), daemon=True
            ).start()

    def signal(self, job: Job, sig: signal.Signals) -> None:
        """Send `sig` to the job's process group (its process alone if it shares the group of a
        terminal: a foreground job), if the process is still the job's."""
        if not process_alive(job.pid, job.pid_start):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if job.own_group:
                os.killpg(job.pid, sig)  # type: ignore[arg-type]
            else:
                os.kill(job.pid, sig)  # type: ignore[arg-type]

    def escalate(self, job: Job, grace: float) -> None:
        """Wait up to `grace` seconds for the job's process to go, then SIGKILL it."""
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not process_alive(job.pid, job.pid_start):
                return
            time.sleep(0.2)
        self.signal(job, signal.SIGKILL)
        for _ in range(50):
            if not process_alive(job.pid, job.pid_start):
                return
            time.sleep(0.1)

    def _escalate_then(self, job: Job, grace: float, then: Callable[[], object]) -> None:
        self.escalate(job, grace)
        with contextlib.suppress(sqlite3.Error):
            then()
