"""The job table: `<runs root>/jobs.sqlite`, one row per job, and the `Job` record a row reads as.

A row holds the job's kind, config, device, status, pid, times, exit code, run folder, a
one-line status message, the error with the tail of its log, and where it runs (backend, engine
address, the engine's id of the job). Statuses: queued -> running -> succeeded | failed |
cancelled.

`JobStore` is the reading and writing of rows, nothing else: which row to write when is decided
by the registry (`core.jobs.registry`), the local launcher (`core.jobs.local`), the cluster
reconcile (`core.jobs.reconcile`) and the job process (`core.jobs.jobmain`). Decisions that must
not race across processes (the queue, a cancel, a claim) run inside `transaction()`, an
exclusive SQLite write transaction.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from core.errors import LensError
from core.io import MigrationStep, migrated_name
from core.jobs.cluster import LOCAL
from core.jobs.runfiles import LOG_TXT, log_tail
from core.kvstore import open_untouched, use_wal

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
#: Job kinds that run no model themselves: they submit other jobs through the registry and wait
#: for them (a protocol's arms), so they take no slot of the per-device queue.
COORDINATOR_KINDS = frozenset({"protocol"})


class JobError(LensError):
    """A job could not be found, started, cancelled or resumed."""


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
    def holds_device(self) -> bool:
        """Takes a slot of its device's local queue while it runs. A coordinator (a protocol:
        `COORDINATOR_KINDS`) only submits jobs and waits for them, so it holds none, and the
        runs it queues on its device can start."""
        return not self.on_cluster and self.kind not in COORDINATOR_KINDS

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

#: Columns added after the first release, with their definitions: `python -m core migrate` adds
#: them to an older jobs.sqlite (`migrate_job_table`; its jobs are local ones), which `JobStore`
#: refuses to open until then.
_ADDED_COLUMNS = {
    "backend": "TEXT NOT NULL DEFAULT 'local'",
    "engine_address": "TEXT",
    "engine_id": "TEXT",
}


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


def log_line(run_dir: str | Path, text: str) -> Path:
    """Append "[time] text" to the run folder's log.txt (the folder made if needed); its path."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    with open(run / LOG_TXT, "ab") as log:
        log.write(f"[{datetime.now().isoformat(timespec='seconds')}] {text}\n".encode())
    return run / LOG_TXT


def new_job_id() -> str:
    """A new job id: the time it was made and 4 random hex digits."""
    return datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2)


def _row_to_job(row: tuple[Any, ...]) -> Job:
    data = dict(zip(_COLUMNS, row, strict=True))
    data["config"] = json.loads(data["config"])
    data["own_group"] = bool(data["own_group"])
    data["cancel_requested"] = bool(data["cancel_requested"])
    return Job(**data)


class JobStore:
    """The rows of `<root>/jobs.sqlite` (WAL; the table made on open). A table of an older
    version is a one-line `LensError` naming `python -m core migrate`, which brings it up to
    date."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / REGISTRY_DB
        with self.connect() as db:
            have = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
            missing = [name for name in _ADDED_COLUMNS if have and name not in have]
            if not missing:  # an old table is left exactly as it is
                use_wal(db)
                db.execute(_SCHEMA)
        if missing:
            raise LensError(
                f"The job registry {self.path} was written by an older version (no "
                f"{', '.join(missing)} column): run `python -m core migrate` to bring it up to "
                "date (it keeps a copy of the old file)."
            )

    # -- plumbing ---------------------------------------------------------------------------

    def connect(self) -> sqlite3.Connection:
        """A connection in autocommit mode that waits up to a minute for a lock."""
        db = sqlite3.connect(self.path, timeout=60, isolation_level=None)
        db.execute("PRAGMA busy_timeout=60000")
        return db

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """An exclusive write transaction (serialises queue decisions across processes)."""
        db = self.connect()
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

    def select(self, db: sqlite3.Connection, where: str = "", args: tuple = ()) -> list[Job]:
        """The rows `where` picks, on connection `db`."""
        cols = ", ".join(_COLUMNS)
        rows = db.execute(f"SELECT {cols} FROM jobs {where}", args).fetchall()
        return [_row_to_job(r) for r in rows]

    def rows(self, where: str = "", args: tuple = ()) -> list[Job]:
        """The rows `where` picks, read outside any transaction."""
        db = self.connect()
        try:
            return self.select(db, where, args)
        finally:
            db.close()

    def update(self, db: sqlite3.Connection, job_id: str, **values: Any) -> None:
        """Set columns of one row, on connection `db`."""
        sets = ", ".join(f"{k} = ?" for k in values)
        db.execute(f"UPDATE jobs SET {sets} WHERE id = ?", (*values.values(), job_id))

    def insert(self, **values: Any) -> None:
        """Add a row (`config` given as a dict), in a transaction of its own."""
        with self.transaction() as db:
            self.insert_in(db, **values)

    def insert_in(self, db: sqlite3.Connection, **values: Any) -> None:
        """Add a row (`config` given as a dict) on connection `db`."""
        values["config"] = json.dumps(values["config"])
        cols = ", ".join(values)
        marks = ", ".join("?" for _ in values)
        db.execute(f"INSERT INTO jobs ({cols}) VALUES ({marks})", tuple(values.values()))

    def active_twin(
        self, db: sqlite3.Connection, kind: str, config: dict[str, Any], device: str
    ) -> Job | None:
        """The oldest queued or running job of `kind` on `device` whose config equals `config`
        (compared as stored: through JSON, so tuples and lists are alike)."""
        stored = json.loads(json.dumps(config))
        jobs = self.select(
            db,
            "WHERE status IN (?, ?) AND kind = ? AND device = ? ORDER BY created, id",
            (QUEUED, RUNNING, kind, device),
        )
        return next((job for job in jobs if job.config == stored), None)

    def raw(self, job_id: str) -> Job:
        """One row as it is (`JobError` if there is none)."""
        jobs = self.rows("WHERE id = ?", (job_id,))
        if not jobs:
            raise JobError(f"No job '{job_id}' in {self.path}.")
        return jobs[0]

    def one(self, db: sqlite3.Connection, job_id: str) -> Job:
        """One row, on connection `db` (`JobError` if there is none)."""
        jobs = self.select(db, "WHERE id = ?", (job_id,))
        if not jobs:
            raise JobError(f"No job '{job_id}' in {self.path}.")
        return jobs[0]

    # -- how a job ended --------------------------------------------------------------------

    def record_end(
        self,
        db: sqlite3.Connection,
        job_id: str,
        status: str,
        exit_code: int | None,
        error: str | None,
        message: str,
    ) -> None:
        """Record a job's end: its final status, exit code, error and one-word message."""
        self.update(
            db,
            job_id,
            status=status,
            finished=time.time(),
            exit_code=exit_code,
            error=error,
            message=message,
        )

    def record_unreported_end(
        self, db: sqlite3.Connection, job: Job, reason: str, exit_code: int | None
    ) -> None:
        """Finish a job that ended without recording it: cancelled if a cancel was asked, else
        failed with `reason` and the tail of its log."""
        tail = log_tail(job.run_dir)
        status = CANCELLED if job.cancel_requested else FAILED
        why = "cancelled" if job.cancel_requested else reason
        error = why + (f"\n--- last lines of {LOG_TXT} ---\n{tail}" if tail else "")
        self.record_end(db, job.id, status, exit_code, error, why[:300])

    def finish(self, job_id: str, status: str, exit_code: int, error: str = "") -> None:
        """Record the job's own final status (called by the job process just before it exits)."""
        if status not in FINAL_STATUSES:
            raise JobError(f"'{status}' is not a final status.")
        with self.transaction() as db:
            jobs = self.select(db, "WHERE id = ?", (job_id,))
            if not jobs:
                return
            if jobs[0].cancel_requested and status == FAILED:
                status = CANCELLED
            message = {SUCCEEDED: "done", CANCELLED: "cancelled"}.get(status, "failed")
            self.record_end(db, job_id, status, exit_code, error, message)

    # -- status lines and user actions ------------------------------------------------------

    def set_message(self, job_id: str, message: str) -> None:
        """One-line status shown in the jobs list ("scoring 120 examples", "training")."""
        with self.transaction() as db:
            self.update(db, job_id, message=message[:300])

    def note(self, job: Job, message: str) -> None:
        """Set a job's status line, unless it already says that."""
        if job.message != message[:300]:
            self.set_message(job.id, message)

    def request_cancel(self, job_id: str) -> Job:
        """Mark a cancel: a queued job no engine holds is cancelled at once, any other active one
        gets `cancel_requested`. Returns the row as it was before (`JobError` unless active)."""
        with self.transaction() as db:
            job = self.one(db, job_id)
            if job.status not in (QUEUED, RUNNING):
                raise JobError(f"Job {job_id} is already {job.status}.")
            if job.status == QUEUED and not job.engine_id:
                self.update(db, job_id, status=CANCELLED, finished=time.time(), message="cancelled")
            else:
                self.update(db, job_id, cancel_requested=1, message="cancelling")
        return job

    def requeue(self, job_id: str) -> None:
        """Queue a failed or cancelled job again (`JobError` for any other status)."""
        with self.transaction() as db:
            job = self.one(db, job_id)
            if job.status not in (FAILED, CANCELLED):
                raise JobError(
                    f"Only failed or cancelled jobs can be resumed; {job_id} is {job.status}."
                )
            self.update(
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


# --------------------------------------------------------------------------- migration


def missing_columns(path: Path) -> list[str]:
    """The columns added since the first release that the jobs table in `path` lacks (none for
    a missing file or table)."""
    if not path.is_file():
        return []
    with contextlib.closing(open_untouched(path)) as db:
        have = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
    return [name for name in _ADDED_COLUMNS if have and name not in have]


def migrate_job_table(root: Path, *, dry_run: bool = False) -> list[MigrationStep]:
    """`python -m core migrate`'s step for `<root>/jobs.sqlite`: a table of an older version gets
    the columns added since (its jobs ran on the local queue, the default those columns hold),
    after a copy of the old file is kept as `jobs.sqlite.migrated`. One line, or none."""
    path = Path(root) / REGISTRY_DB
    missing = missing_columns(path)
    if not missing:
        return []
    names = ", ".join(missing)
    if dry_run:
        text = (
            f"{path}: would add the columns {names}, keeping the old file as {path.name}.migrated"
        )
        return [MigrationStep(path, text)]
    copy = migrated_name(path)
    temp = copy.with_name(f".{copy.name}.{secrets.token_hex(4)}.tmp")
    with contextlib.closing(sqlite3.connect(path, timeout=60)) as src:
        with contextlib.closing(sqlite3.connect(temp)) as dst:
            src.backup(dst)  # a consistent copy, whatever the journal holds
    temp.replace(copy)
    db = sqlite3.connect(path, timeout=60, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        have = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
        for name in missing:
            if name not in have:
                db.execute(f"ALTER TABLE jobs ADD COLUMN {name} {_ADDED_COLUMNS[name]}")
        db.execute("COMMIT")
    finally:
        db.close()
    text = f"{path}: added the columns {names}; kept the old file as {copy.name}"
    return [MigrationStep(path, text)]


def job_folders(root: Path) -> dict[Path, str]:
    """Run folder -> status of every job in `<root>/jobs.sqlite`, read as any version wrote it
    (for the migration, which must skip the folders of running jobs); empty without the file."""
    path = Path(root) / REGISTRY_DB
    if not path.is_file():
        return {}
    try:
        with contextlib.closing(open_untouched(path)) as db:
            rows = db.execute("SELECT run_dir, status FROM jobs ORDER BY created").fetchall()
    except sqlite3.Error:
        return {}
    return {Path(run_dir): str(status) for run_dir, status in rows}
