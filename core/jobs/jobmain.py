"""The job process: the body of `python -m core job-run JOB_ID`, wherever it runs (the local
queue, a Ray job, a SLURM job, or a foreground `python -m core train`).

It claims the job's row, runs the job kind by its module name (`JOB_KINDS`: the module's
`run_job(job, registry)`; imported by name, so the job system sits below what it runs), records
how the job ended and then starts the next queued job for its device ("chain"), so a queue
submitted from the CLI drains without a browser or the app.
"""

from __future__ import annotations

import importlib
import os
import signal
import time
import traceback
from typing import TYPE_CHECKING

from core.errors import LensError
from core.jobs.local import process_alive, process_start_time
from core.jobs.store import (
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Job,
    JobError,
    JobStore,
)

if TYPE_CHECKING:
    from core.jobs.registry import JobRegistry

#: Job kinds and the module whose `run_job(job, registry) -> None` runs them in the job process.
JOB_KINDS = {
    "train": "core.training.trainer",
    "generate": "core.datagen.run",
    "eval": "core.eval.runner",
    "protocol": "core.study.protocol",
}


class JobCancelled(BaseException):  # noqa: N818 - a control-flow signal, like KeyboardInterrupt
    """Raised inside a job process when it receives SIGTERM (a cancel request)."""


def claim(store: JobStore, job_id: str) -> Job:
    """Make sure the job's row says running with this process's pid (`JobError` if the job
    has ended, or runs in another live process)."""
    me = os.getpid()
    with store.transaction() as db:
        job = store.one(db, job_id)
        if job.status == RUNNING and job.pid == me:
            return job
        if job.status not in (QUEUED, RUNNING) or (
            job.status == RUNNING and process_alive(job.pid, job.pid_start)
        ):
            raise JobError(f"Job {job_id} is {job.status}; it cannot be started here.")
        store.update(
            db,
            job_id,
            status=RUNNING,
            started=time.time(),
            finished=None,
            pid=me,
            pid_start=process_start_time(me),
            own_group=int(os.getpgid(0) == me),
            exit_code=None,
            error="",
            attempts=job.attempts + 1,
        )
    return store.raw(job_id)


def main(job_id: str, registry: JobRegistry) -> int:
    """Run the job, record how it ended, chain the queue.

    Returns the process exit code: 0 succeeded, 2 failed on a user error, 1 on a bug,
    143 cancelled (SIGTERM), 130 interrupted (Ctrl-C in the foreground).
    """
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
