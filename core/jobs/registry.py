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
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from core.errors import LensError
from core.io import write_json_atomic
from core.jobs.cluster import (
    JOB_ENV_DEFAULTS,
    LOCAL,
    PENDING,
    ClusterError,
    Engine,
    current_setting,
    engine_for,
)
from core.jobs.runfiles import CONFIG_JSON, LOG_TXT, log_tail, runs_dir

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = (
    "queued",
    "running",
    "succeeded",
    "failed",
    "cancelled",
)
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
FINAL_STATUSES = (SUCCEEDED, FAILED, CANCELLED)
REGISTRY_DB = "jobs.sqlite"

DEFAULT_GRACE_SECONDS = 10.0
PROJECT_ROOT = Path(__file__).resolve().parents[2]

#: Job kinds and the module whose `run_job(job, registry) -> None` runs them in the job process.
JOB_KINDS = {
    "train": "core.training.trainer",
    "generate": "core.datagen.run",
    "eval": "core.eval.runner",
    "protocol": "core.study.protocol",
}


class JobError(LensError):
    """A job could not be found, started, cancelled or resumed."""


class JobCancelled(BaseException):  # noqa: N818 - a control-flow signal, like KeyboardInterrupt
    """Raised inside a job process when it receives SIGTERM (a cancel request)."""


# --------------------------------------------------------------------------- run folder files


def core_process_env() -> dict[str, str]:
    """This process's environment for a child `python -m core ...`: unbuffered output, and the
    project on PYTHONPATH so the child imports the same code from any working folder."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p
    )
    return env


# --------------------------------------------------------------------------- registry


@dataclass
class Job:
    """One row of the registry."""

    id: str
    kind: str
    label: str
    config: dict[str, Any]
    device: str
    status: str
    run_dir: str
    created: float
    started: float | None = None
    finished: float | None = None
    pid: int | None = None
    pid_start: float | None = None
    own_group: bool = True
    exit_code: int | None = None
    message: str = ""
    error: str = ""
    cancel_requested: bool = False
    attempts: int = 0
    backend: str = LOCAL
    engine_address: str | None = None
    engine_id: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def path(self) -> Path:
        """The run folder."""
        return Path(self.run_dir)

    @property
    def active(self) -> bool:
        """Queued or running."""
        return self.status in (QUEUED, RUNNING)

    @property
    def on_cluster(self) -> bool:
        """Submitted to a cluster engine (Ray, SLURM), not the local queue."""
        return self.backend != LOCAL

    @property
    def where(self) -> str:
        """ "local", or the backend and its address ("ray http://…", "slurm gpu") for job lists."""
        return (
            LOCAL if not self.on_cluster else f"{self.backend} {self.engine_address or ''}".strip()
        )

    @property
    def elapsed(self) -> float | None:
        """Seconds since the (latest) start, until the end if it ended."""
        if self.started is None:
            return None
        return (self.finished or time.time()) - self.started

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (for JSON output)."""
        return asdict(self)


_COLUMNS = (
    "id",
    "kind",
    "label",
    "config",
    "device",
    "status",
    "run_dir",
    "created",
    "started",
    "finished",
    "pid",
    "pid_start",
    "own_group",
    "exit_code",
    "message",
    "error",
    "cancel_requested",
    "attempts",
    "backend",
    "engine_address",
    "engine_id",
)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    label TEXT NOT NULL DEFAULT '',
    config TEXT NOT NULL,
    device TEXT NOT NULL,
    status TEXT NOT NULL,
    run_dir TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    pid INTEGER,
    pid_start REAL,
    own_group INTEGER NOT NULL DEFAULT 1,
    exit_code INTEGER,
    message TEXT NOT NULL DEFAULT '',
    error TEXT NOT NULL DEFAULT '',
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    backend TEXT NOT NULL DEFAULT 'local',
    engine_address TEXT,
    engine_id TEXT
)
"""

#: Columns added after the first release, with their definitions: an older jobs.sqlite gets them
#: on open (its jobs are local ones).
_ADDED_COLUMNS = {
    "backend": "TEXT NOT NULL DEFAULT 'local'",
    "engine_address": "TEXT",
    "engine_id": "TEXT",
}


# Pids of jobs this process launched and is waiting on (see `JobRegistry._reap`).
_REAPING: set[int] = set()


def jobs_by_run(jobs: list[Job]) -> dict[str, Job]:
    """Jobs by the name of their run folder (and by job id, where it differs): a protocol's arm
    runs in `<protocol>-<arm>-s<seed>/` under a job id of its own. Of several jobs in one
    folder (a resumed run), the newest wins; `jobs` is newest first, as `JobRegistry.list`
    gives them."""
    found: dict[str, Job] = {}
    for job in jobs:
        found.setdefault(job.id, job)
        found.setdefault(Path(job.run_dir).name, job)
    return found


def _log_line(run_dir: str | Path, text: str) -> Path:
    """Append "[time] text" to the run folder's log.txt (the folder made if needed); its path."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    with open(run / LOG_TXT, "ab") as log:
        log.write(f"[{datetime.now().isoformat(timespec='seconds')}] {text}\n".encode())
    return run / LOG_TXT


def _row_to_job(row: tuple[Any, ...]) -> Job:
    data = dict(zip(_COLUMNS, row, strict=True))
    data["config"] = json.loads(data["config"])
    data["own_group"] = bool(data["own_group"])
    data["cancel_requested"] = bool(data["cancel_requested"])
    return Job(**data)


def _new_job_id() -> str:
    return datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def _process_start_time(pid: int) -> float | None:
    """Start time of a live, non-zombie process, or None if there is none with that pid."""
    import psutil

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
    started = _process_start_time(pid)
    if started is None:
        return False
    return pid_start is None or abs(started - pid_start) < 1.0


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "the process ended without reporting a result (killed or crashed)"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the process was killed by {name}"
    return f"the process exited with code {code} without reporting a result"


def _max_per_device_default() -> int:
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
    from core.model.loading import resolve_device

    return resolve_device("auto").type


class JobRegistry:
    """The job table in `<root>/jobs.sqlite` plus launching, reconciling and the queue."""

    def __init__(self, root: str | Path | None = None, max_per_device: int | None = None) -> None:
        self.root = Path(root).expanduser() if root else runs_dir()
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / REGISTRY_DB
        self.max_per_device = max_per_device or _max_per_device_default()
        self._engines: dict[tuple[str, str], Engine] = {}
        with self._connect() as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(_SCHEMA)
            have = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
            for name, definition in _ADDED_COLUMNS.items():
                if name not in have:
                    with contextlib.suppress(sqlite3.OperationalError):  # added concurrently
                        db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {definition}")

    # -- plumbing ---------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        db.execute("PRAGMA busy_timeout=60000")
        return db

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """An exclusive write transaction (serialises queue decisions across processes)."""
        db = self._connect()
        try:
            db.execute("BEGIN IMMEDIATE")
            yield db
            db.execute("COMMIT")
        except BaseException:
            # a SIGTERM (JobCancelled) can land after COMMIT or before BEGIN took effect: then
            # there is nothing to roll back, and the cancel must not turn into an sqlite error
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        finally:
            db.close()

    def _select(self, db: sqlite3.Connection, where: str = "", args: tuple = ()) -> list[Job]:
        cols = ", ".join(_COLUMNS)
        rows = db.execute(f"SELECT {cols} FROM jobs {where}", args).fetchall()
        return [_row_to_job(r) for r in rows]

    def _update(self, db: sqlite3.Connection, job_id: str, **values: Any) -> None:
        sets = ", ".join(f"{k} = ?" for k in values)
        db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*values.values(), job_id))

    def _finish(
        self,
        db: sqlite3.Connection,
        job_id: str,
        status: str,
        exit_code: int | None,
        error: str | None,
        message: str,
    ) -> None:
        """Record a job's end: its final status, exit code, error and one-word message."""
        self._update(db, job_id, status=status, finished=time.time(), exit_code=exit_code,
                     error=error, message=message)  # fmt: skip

    def _raw(self, job_id: str) -> Job:
        db = self._connect()
        try:
            jobs = self._select(db, "WHERE id = ?", (job_id,))
        finally:
            db.close()
        if not jobs:
            raise JobError(f"No job '{job_id}' in {self.path}.")
        return jobs[0]

    # -- reading ----------------------------------------------------------------------------

    def get(self, job_id: str, refresh: bool = True) -> Job:
        """One job, after reconciling dead processes and kicking the queue (unless refresh=False)."""
        if refresh:
            self.refresh()
        return self._raw(job_id)

    def list(self, limit: int = 200, refresh: bool = True) -> list[Job]:
        """Jobs, newest first (reconciled and with the queue kicked unless refresh=False)."""
        if refresh:
            self.refresh()
        db = self._connect()
        try:
            return self._select(db, "ORDER BY created DESC, id DESC LIMIT ?", (int(limit),))
        finally:
            db.close()

    def refresh(self) -> None:
        """Reconcile dead processes, then start queued jobs on free devices."""
        self.reconcile()
        self.kick()

    def reconcile(self) -> list[str]:
        """Mark running jobs whose process is gone as failed (or cancelled if asked to cancel).

        Returns the ids that changed. The error holds the tail of the job's log.
        """
        db = self._connect()
        try:
            running = self._select(db, "WHERE status = ?", (RUNNING,))
        finally:
            db.close()
        # Children of this process are left to their reaper thread, which knows the exit code.
        dead = [
            j
            for j in running
            if not j.on_cluster and j.pid not in _REAPING and not process_alive(j.pid, j.pid_start)
        ]
        changed = []
        for job in dead:
            if self._finish_if_running(job.id, job.pid, exit_code=None):
                changed.append(job.id)
        return changed + self._reconcile_cluster()

    # -- cluster jobs -----------------------------------------------------------------------

    def _engine(self, backend: str, address: str | None) -> Engine:
        """The (cached) client of one cluster engine."""
        key = (backend, address or "")
        if key not in self._engines:
            self._engines[key] = engine_for(backend, address)
        return self._engines[key]

    def _reconcile_cluster(self) -> list[str]:
        """Ask the engine about every cluster job it holds that has not recorded its own end:
        one the engine finished, stopped or no longer knows becomes failed (or cancelled, if a
        cancel was asked) with the engine's reason and the log tail. A cluster that does not
        answer leaves its jobs as they are, with a note in their status line."""
        db = self._connect()
        try:
            held = self._select(
                db,
                "WHERE backend != ? AND engine_id IS NOT NULL AND status IN (?, ?)",
                (LOCAL, QUEUED, RUNNING),
            )
        finally:
            db.close()
        changed: list[str] = []
        unreachable: dict[str, str] = {}
        for job in held:
            address = f"{job.backend} {job.engine_address or ''}"
            if address in unreachable:
                self._note(job, unreachable[address])
                continue
            try:
                engine = self._engine(job.backend, job.engine_address)
                state = engine.state(job.engine_id or "")
            except ClusterError as exc:
                unreachable[address] = str(exc)
                self._note(job, str(exc))
                continue
            if state.status == PENDING and job.status == QUEUED:
                why = state.message or "no free resources yet"
                self._note(job, f"waiting for the cluster ({engine.label}: PENDING, {why})")
            if not state.final:
                continue
            if state.start_timed_out and job.status == QUEUED and not job.cancel_requested:
                if self._hand_over_again(job, engine.label):
                    changed.append(job.id)
                continue
            if state.status == "MISSING":
                reason = f"lost by the cluster: {state.message} ({engine.lost_hint})"
            else:
                detail = f": {state.message}" if state.message else ""
                reason = f"the cluster reports the job {state.status}{detail}"
            if self._finish_engine_job(job, reason, state.exit_code):
                changed.append(job.id)
        return changed

    def _hand_over_again(self, job: Job, label: str) -> bool:
        """A job the engine dropped unstarted after waiting too long for resources goes back to
        this queue (engine id cleared), so the next `kick` hands it over again."""
        with self._transaction() as db:
            rows = self._select(db, "WHERE id = ?", (job.id,))
            if not rows or rows[0].status != QUEUED or rows[0].engine_id != job.engine_id:
                return False
            note = f"{label} dropped it unstarted after its start timeout; handing it over again"
            self._update(db, job.id, engine_id=None, message=note)
        with contextlib.suppress(OSError):
            _log_line(job.run_dir, f"{note} (was {job.engine_id})")
        return True

    def _note(self, job: Job, message: str) -> None:
        """Set a job's status line, unless it already says that."""
        if job.message != message[:300]:
            with self._transaction() as db:
                self._update(db, job.id, message=message[:300])

    def _finish_engine_job(self, job: Job, reason: str, exit_code: int | None) -> bool:
        """Record the end of a cluster job that did not record it itself."""
        with self._transaction() as db:
            rows = self._select(db, "WHERE id = ?", (job.id,))
            if not rows or rows[0].status not in (QUEUED, RUNNING):
                return False
            if rows[0].engine_id != job.engine_id:  # resumed meanwhile: a new engine job
                return False
            self._record_unreported_end(db, rows[0], reason, exit_code)
        return True

    def _hand_to_cluster(self, db: sqlite3.Connection, job: Job) -> None:
        """Submit a queued cluster job to its engine (inside `kick`'s transaction, so no two
        processes submit it twice); it stays queued until its process claims it."""
        engine_id = (
            f"plens-{job.id}-a{job.attempts + 1}-{secrets.token_hex(2)}"  # one per hand-over
        )
        log = _log_line(
            job.run_dir, f"submitting job {job.id} to {job.where} (attempt {job.attempts + 1})"
        )
        engine_id = self._engine(job.backend, job.engine_address).submit(
            engine_id, job.id, job.kind, job.device, self.root, log, PROJECT_ROOT
        )
        self._update(db, job.id, engine_id=engine_id, message="submitted to the cluster")

    def _finish_if_running(self, job_id: str, pid: int | None, exit_code: int | None) -> bool:
        """Record the end of a job that did not report it itself (still 'running' with `pid`)."""
        with self._transaction() as db:
            jobs = self._select(db, "WHERE id = ?", (job_id,))
            if not jobs or jobs[0].status != RUNNING or jobs[0].pid != pid:
                return False
            self._record_unreported_end(db, jobs[0], _describe_exit(exit_code), exit_code)
        return True

    def _record_unreported_end(
        self, db: sqlite3.Connection, job: Job, reason: str, exit_code: int | None
    ) -> None:
        """Finish a job that ended without recording it: cancelled if a cancel was asked, else
        failed with `reason` and the tail of its log."""
        tail = log_tail(job.run_dir)
        status = CANCELLED if job.cancel_requested else FAILED
        why = "cancelled" if job.cancel_requested else reason
        error = why + (f"\n--- last lines of {LOG_TXT} ---\n{tail}" if tail else "")
        self._finish(db, job.id, status, exit_code, error, why[:300])

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
        if kind not in JOB_KINDS:
            raise JobError(f"Unknown job kind '{kind}' (known: {', '.join(JOB_KINDS)}).")
        setting = current_setting(self.root, backend, address)
        if setting.name != LOCAL:
            self._engine(setting.name, setting.address).check()
        job_id = _new_job_id()
        run = Path(run_dir).expanduser().absolute() if run_dir else self.root / job_id
        run.mkdir(parents=True, exist_ok=run_dir is not None)
        if not (run / CONFIG_JSON).exists():
            write_json_atomic(run / CONFIG_JSON, config)
        with self._transaction() as db:
            db.execute(
                "INSERT INTO jobs (id, kind, label, config, device, status, run_dir, created, "
                "backend, engine_address) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    job_id,
                    kind,
                    label,
                    json.dumps(config),
                    resolve_job_device(device),
                    QUEUED,
                    str(run),
                    time.time(),
                    setting.name,
                    setting.address,
                ),
            )
        if start:
            self.kick()
        return self._raw(job_id)

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
        job_id = _new_job_id()
        run = Path(run_dir).expanduser().absolute() if run_dir else self.root / job_id
        run.mkdir(parents=True, exist_ok=True)
        if not (run / CONFIG_JSON).exists():  # an existing run keeps its config (resume check)
            write_json_atomic(run / CONFIG_JSON, config)
        now = time.time()
        with self._transaction() as db:
            db.execute(
                "INSERT INTO jobs (id, kind, label, config, device, status, run_dir, created, "
                "started, pid, pid_start, own_group, attempts) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, 1)",
                (
                    job_id,
                    kind,
                    label,
                    json.dumps(config),
                    resolve_job_device(device),
                    RUNNING,
                    str(run),
                    now,
                    now,
                    os.getpid(),
                    _process_start_time(os.getpid()),
                ),
            )
        return self._raw(job_id)

    def kick(self) -> list[str]:
        """Start queued jobs (oldest first) on every device with a free slot; return their ids."""
        started: list[str] = []
        with self._transaction() as db:
            active = self._select(
                db, "WHERE status IN (?, ?) ORDER BY created, id", (QUEUED, RUNNING)
            )
            running: dict[str, int] = {}
            for job in active:
                if job.status == RUNNING and not job.on_cluster:
                    running[job.device] = running.get(job.device, 0) + 1
            for job in active:
                if job.on_cluster:  # the engine queues and places it; no per-device cap here
                    if job.status == QUEUED and not job.engine_id:
                        try:
                            self._hand_to_cluster(db, job)
                        except (ClusterError, OSError) as exc:
                            self._finish(db, job.id, FAILED, None, str(exc), "failed")
                            continue
                        started.append(job.id)
                    continue
                if job.status != QUEUED or running.get(job.device, 0) >= self.max_per_device:
                    continue
                try:
                    proc = self._launch(job)
                except JobError as exc:
                    self._update(db, job.id, status=FAILED, finished=time.time(), error=str(exc))
                    continue
                self._update(
                    db,
                    job.id,
                    status=RUNNING,
                    started=time.time(),
                    finished=None,
                    pid=proc.pid,
                    pid_start=_process_start_time(proc.pid),
                    own_group=1,
                    exit_code=None,
                    error="",
                    message="starting",
                    attempts=job.attempts + 1,
                )
                running[job.device] = running.get(job.device, 0) + 1
                started.append(job.id)
                _REAPING.add(proc.pid)
                threading.Thread(
                    target=self._reap, args=(job.id, proc), daemon=True, name=f"reap-{job.id}"
                ).start()
        return started

    def _launch(self, job: Job) -> subprocess.Popen:
        """Start `python -m core job-run ID` in a new session, output appended to log.txt."""
        env = {**JOB_ENV_DEFAULTS, **core_process_env(), "PLENS_RUNS_DIR": str(self.root)}
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

    def _reap(self, job_id: str, proc: subprocess.Popen) -> None:
        """Wait for a launched job; if it died without reporting, record that. Then kick."""
        code = proc.wait()
        try:
            self._finish_if_running(job_id, proc.pid, exit_code=code)
            self.kick()
        except (sqlite3.Error, LensError):  # registry gone (a test's temp folder) or launch failed
            pass
        finally:
            _REAPING.discard(proc.pid)

    # -- called by the job process ----------------------------------------------------------

    def claim(self, job_id: str) -> Job:
        """Called by `job-run` in the job process: make sure the row says running with our pid."""
        me = os.getpid()
        with self._transaction() as db:
            jobs = self._select(db, "WHERE id = ?", (job_id,))
            if not jobs:
                raise JobError(f"No job '{job_id}' in {self.path}.")
            job = jobs[0]
            if job.status == RUNNING and job.pid == me:
                return job
            if job.status not in (QUEUED, RUNNING) or (
                job.status == RUNNING and process_alive(job.pid, job.pid_start)
            ):
                raise JobError(f"Job {job_id} is {job.status}; it cannot be started here.")
            self._update(
                db,
                job_id,
                status=RUNNING,
                started=time.time(),
                finished=None,
                pid=me,
                pid_start=_process_start_time(me),
                own_group=int(os.getpgid(0) == me),
                exit_code=None,
                error="",
                attempts=job.attempts + 1,
            )
        return self._raw(job_id)

    def set_message(self, job_id: str, message: str) -> None:
        """One-line status shown in the jobs list ("scoring 120 examples", "training")."""
        with self._transaction() as db:
            self._update(db, job_id, message=message[:300])

    def finish(self, job_id: str, status: str, exit_code: int, error: str = "") -> None:
        """Record the job's own final status (called by the job process just before it exits)."""
        if status not in FINAL_STATUSES:
            raise JobError(f"'{status}' is not a final status.")
        with self._transaction() as db:
            jobs = self._select(db, "WHERE id = ?", (job_id,))
            if not jobs:
                return
            if jobs[0].cancel_requested and status == FAILED:
                status = CANCELLED
            message = {SUCCEEDED: "done", CANCELLED: "cancelled"}.get(status, "failed")
            self._finish(db, job_id, status, exit_code, error, message)

    # -- user actions -----------------------------------------------------------------------

    def cancel(self, job_id: str, grace: float = DEFAULT_GRACE_SECONDS, wait: bool = True) -> Job:
        """Cancel a job: a queued one at once; a running one with SIGTERM, then SIGKILL.

        With `wait=False` (the app) the escalation runs in a daemon thread and this returns at
        once; the job shows "cancelled" when its process has gone.
        """
        with self._transaction() as db:
            jobs = self._select(db, "WHERE id = ?", (job_id,))
            if not jobs:
                raise JobError(f"No job '{job_id}' in {self.path}.")
            job = jobs[0]
            if job.status not in (QUEUED, RUNNING):
                raise JobError(f"Job {job_id} is already {job.status}.")
            if job.status == QUEUED and not job.engine_id:
                self._update(
                    db, job_id, status=CANCELLED, finished=time.time(), message="cancelled"
                )
            else:
                self._update(db, job_id, cancel_requested=1, message="cancelling")
        if job.status == QUEUED and not job.engine_id:
            return self._raw(job_id)
        if job.on_cluster:
            return self._cancel_on_cluster(job, grace, wait)
        self._signal(job, signal.SIGTERM)
        if wait:
            self._escalate(job, grace)
            self.refresh()
        else:
            threading.Thread(
                target=self._escalate_then_refresh, args=(job, grace), daemon=True
            ).start()
        return self._raw(job_id)

    def _cancel_on_cluster(self, job: Job, grace: float, wait: bool) -> Job:
        """Ask the engine to stop a cluster job. One it had not started yet is cancelled at
        once (should its process start anyway, `claim` refuses it); a running one records
        "cancelled" itself on SIGTERM, or the next reconcile does once the engine has it."""
        self._engine(job.backend, job.engine_address).stop(job.engine_id or "")
        if job.status == QUEUED:
            with self._transaction() as db:
                row = self._select(db, "WHERE id = ?", (job.id,))[0]
                if row.status == QUEUED:
                    self._finish(db, job.id, CANCELLED, None, "cancelled", "cancelled")
            return self._raw(job.id)
        if wait:
            deadline = time.monotonic() + grace + 10.0
            while time.monotonic() < deadline and self.get(job.id).status not in FINAL_STATUSES:
                time.sleep(0.3)
        return self._raw(job.id)

    def _signal(self, job: Job, sig: signal.Signals) -> None:
        if not process_alive(job.pid, job.pid_start):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if job.own_group:
                os.killpg(job.pid, sig)  # type: ignore[arg-type]
            else:
                os.kill(job.pid, sig)  # type: ignore[arg-type]

    def _escalate(self, job: Job, grace: float) -> None:
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not process_alive(job.pid, job.pid_start):
                return
            time.sleep(0.2)
        self._signal(job, signal.SIGKILL)
        for _ in range(50):
            if not process_alive(job.pid, job.pid_start):
                return
            time.sleep(0.1)

    def _escalate_then_refresh(self, job: Job, grace: float) -> None:
        self._escalate(job, grace)
        with contextlib.suppress(sqlite3.Error):
            self.refresh()

    def resume(self, job_id: str) -> Job:
        """Queue a failed or cancelled job again in the same run folder (training continues
        from its last checkpoint)."""
        with self._transaction() as db:
            jobs = self._select(db, "WHERE id = ?", (job_id,))
            if not jobs:
                raise JobError(f"No job '{job_id}' in {self.path}.")
            job = jobs[0]
            if job.status not in (FAILED, CANCELLED):
                raise JobError(
                    f"Only failed or cancelled jobs can be resumed; {job_id} is {job.status}."
                )
            self._update(
                db,
                job_id,
                status=QUEUED,
                finished=None,
                pid=None,
                pid_start=None,
                exit_code=None,
                cancel_requested=0,
                engine_id=None,
                message="queued (resume)",
            )
        self.kick()
        return self._raw(job_id)

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


# --------------------------------------------------------------------------- job process


def run_job_process(job_id: str, registry: JobRegistry | None = None) -> int:
    """Body of `python -m core job-run JOB_ID`: run the job, record how it ended, chain the queue.

    Returns the process exit code: 0 succeeded, 2 failed on a user error, 1 on a bug,
    143 cancelled (SIGTERM), 130 interrupted (Ctrl-C in the foreground).
    """
    import importlib
    import traceback

    registry = registry or JobRegistry()
    job = registry.claim(job_id)

    terminated: list[int] = []

    def on_sigterm(signum: int, frame: object) -> None:
        if not terminated:  # a second SIGTERM (SLURM's cancel sends two) must not interrupt
            terminated.append(signum)  # the handling of the first
            raise JobCancelled()

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    status, code, error = FAILED, 1, ""
    try:
        module = importlib.import_module(JOB_KINDS[job.kind])
        module.run_job(job, registry)
        status, code = SUCCEEDED, 0
    except JobCancelled:
        status, code, error = CANCELLED, 128 + signal.SIGTERM, "cancelled"
        print("job cancelled (SIGTERM)", flush=True)
    except KeyboardInterrupt:  # Ctrl-C on a foreground `python -m core train`
        status, code, error = CANCELLED, 130, "interrupted"
        print("job interrupted", flush=True)
    except LensError as exc:
        status, code, error = FAILED, 2, str(exc)
        print(f"error: {exc}", flush=True)
    except Exception as exc:  # noqa: BLE001 - recorded with its traceback for the user
        trace = traceback.format_exc()
        print(trace, flush=True)
        status, code = FAILED, 1
        error = f"unexpected {type(exc).__name__}: {exc}\n{trace[-4000:]}"
    finally:
        signal.signal(signal.SIGTERM, previous)
    if (
        status == CANCELLED
        and job.on_cluster
        and not registry.get(job_id, refresh=False).cancel_requested
    ):
        # The engine stopped the job without a cancel from us (an outside `scancel`, a time
        # limit, preemption): leave the row running, so the registry's next look at the engine
        # records it as failed with the engine's reason.
        print("job stopped by the cluster (SIGTERM) without a cancel from the registry", flush=True)
        return code
    registry.finish(job_id, status, code, error)
    try:
        registry.kick()
    except LensError as exc:  # the next job could not start; the app will retry on read
        print(f"warning: could not start the next queued job: {exc}", flush=True)
    return code
