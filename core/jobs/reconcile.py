"""Cluster jobs: handing queued jobs to their engine (Ray, SLURM) and reconciling the job table
with what the engine says of them, through the `Engine` interface (`core.jobs.engine`;
`core.jobs.cluster.engine_for` gives one per backend and address).

A queued cluster job is handed over at once (no per-device cap: the engine queues and places
it) and stays queued until its process claims its row. The registry asks the engine about every
job it holds where it would look at a local pid: one the engine finished, stopped or no longer
knows without having recorded its own end becomes failed (or cancelled, if a cancel was asked)
with the engine's reason and the log tail; one the engine dropped unstarted after its start
timeout goes back to the queue to be handed over again. A cluster that does not answer leaves
its jobs as they are, with a note in their status line.
"""

from __future__ import annotations

import contextlib
import secrets
import sqlite3
import time
from collections.abc import Callable

from core.jobs.cluster import LOCAL, engine_for
from core.jobs.engine import PENDING, ClusterError, Engine
from core.jobs.local import PROJECT_ROOT
from core.jobs.store import (
    CANCELLED,
    FAILED,
    FINAL_STATUSES,
    QUEUED,
    RUNNING,
    Job,
    JobStore,
    log_line,
)


class ClusterJobs:
    """The cluster side of one job table: engine clients (cached per backend and address),
    hand-over, reconcile and cancel."""

    def __init__(self, store: JobStore) -> None:
        self.store = store
        self._engines: dict[tuple[str, str], Engine] = {}

    def engine(self, backend: str, address: str | None) -> Engine:
        """The (cached) client of one cluster engine."""
        key = (backend, address or "")
        if key not in self._engines:
            self._engines[key] = engine_for(backend, address)
        return self._engines[key]

    # -- handing jobs over ------------------------------------------------------------------

    def hand_over(self, db: sqlite3.Connection, job: Job) -> bool:
        """Submit a queued cluster job to its engine inside the queue's transaction `db`;
        an engine that refuses it (or a run folder that cannot be written) fails the job.
        Returns whether it was handed over."""
        try:
            self._hand_to_cluster(db, job)
        except (ClusterError, OSError) as exc:
            self.store.record_end(db, job.id, FAILED, None, str(exc), "failed")
            return False
        return True

    def _hand_to_cluster(self, db: sqlite3.Connection, job: Job) -> None:
        """Submit a queued cluster job to its engine (inside `kick`'s transaction, so no two
        processes submit it twice); it stays queued until its process claims it."""
        engine_id = (
            f"plens-{job.id}-a{job.attempts + 1}-{secrets.token_hex(2)}"  # one per hand-over
        )
        log = log_line(
            job.run_dir, f"submitting job {job.id} to {job.where} (attempt {job.attempts + 1})"
        )
        engine_id = self.engine(job.backend, job.engine_address).submit(
            engine_id, job.id, job.kind, job.device, self.store.root, log, PROJECT_ROOT
        )
        self.store.update(db, job.id, engine_id=engine_id, message="submitted to the cluster")

    # -- reconciling ------------------------------------------------------------------------

    def reconcile(self) -> list[str]:
        """Ask the engine about every cluster job it holds that has not recorded its own end:
        one the engine finished, stopped or no longer knows becomes failed (or cancelled, if a
        cancel was asked) with the engine's reason and the log tail. A cluster that does not
        answer leaves its jobs as they are, with a note in their status line."""
        held = self.store.rows(
            "WHERE backend != ? AND engine_id IS NOT NULL AND status IN (?, ?)",
            (LOCAL, QUEUED, RUNNING),
        )
        changed: list[str] = []
        unreachable: dict[str, str] = {}
        for job in held:
            address = f"{job.backend} {job.engine_address or ''}"
            if address in unreachable:
                self.store.note(job, unreachable[address])
                continue
            try:
                engine = self.engine(job.backend, job.engine_address)
                state = engine.state(job.engine_id or "")
            except ClusterError as exc:
                unreachable[address] = str(exc)
                self.store.note(job, str(exc))
                continue
            if state.status == PENDING and job.status == QUEUED:
                why = state.message or "no free resources yet"
                self.store.note(job, f"waiting for the cluster ({engine.label}: PENDING, {why})")
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
        with self.store.transaction() as db:
            rows = self.store.select(db, "WHERE id = ?", (job.id,))
            if not rows or rows[0].status != QUEUED or rows[0].engine_id != job.engine_id:
                return False
            note = f"{label} dropped it unstarted after its start timeout; handing it over again"
            self.store.update(db, job.id, engine_id=None, message=note)
        with contextlib.suppress(OSError):
            log_line(job.run_dir, f"{note} (was {job.engine_id})")
        return True

    def _finish_engine_job(self, job: Job, reason: str, exit_code: int | None) -> bool:
        """Record the end of a cluster job that did not record it itself."""
        with self.store.transaction() as db:
            rows = self.store.select(db, "WHERE id = ?", (job.id,))
            if not rows or rows[0].status not in (QUEUED, RUNNING):
                return False
            if rows[0].engine_id != job.engine_id:  # resumed meanwhile: a new engine job
                return False
            self.store.record_unreported_end(db, rows[0], reason, exit_code)
        return True

    # -- cancelling -------------------------------------------------------------------------

    def cancel(self, job: Job, grace: float, wait: bool, poll: Callable[[str], Job]) -> None:
        """Ask the engine to stop a cluster job. One it had not started yet is cancelled at
        once (should its process start anyway, `claim` refuses it); a running one records
        "cancelled" itself on SIGTERM, or the next reconcile does once the engine has it.
        With `wait`, wait (reading the job with `poll`) until it has ended."""
        self.engine(job.backend, job.engine_address).stop(job.engine_id or "")
        if job.status == QUEUED:
            with self.store.transaction() as db:
                row = self.store.select(db, "WHERE id = ?", (job.id,))[0]
                if row.status == QUEUED:
                    self.store.record_end(db, job.id, CANCELLED, None, "cancelled", "cancelled")
            return
        if wait:
            deadline = time.monotonic() + grace + 10.0
            while time.monotonic() < deadline and poll(job.id).status not in FINAL_STATUSES:
                time.sleep(0.3)
