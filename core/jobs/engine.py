"""What every cluster engine shares: the `Engine` interface the registry calls (check, submit,
state, stop, logs), the state an engine reports (`EngineState`, Ray's job states as text), the
command a cluster job runs and the environment it starts with, and `ClusterError`.

`core.jobs.cluster` (the backend setting, `RayEngine`, `engine_for`) and `core.jobs.slurm`
(`SlurmEngine`) both build on this module, so neither imports the other's internals.
"""

from __future__ import annotations

import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from core.errors import LensError

#: Environment variables a cluster job inherits from the submitting process (besides PYTHONPATH):
#: the app's own settings and the Hugging Face / threading ones that change results or speed.
_FORWARDED_PREFIXES = ("PLENS_", "HF_", "TRANSFORMERS_", "TOKENIZERS_")
_FORWARDED_NAMES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")

# Ray's job states (ray.job_submission.JobStatus values), kept as text so this module imports
# without Ray.
PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED = (
    "PENDING",
    "RUNNING",
    "STOPPED",
    "SUCCEEDED",
    "FAILED",
)
ENGINE_FINAL = (STOPPED, SUCCEEDED, FAILED)


class ClusterError(LensError):
    """The cluster backend is misconfigured, or its engine does not answer."""


@dataclass
class EngineState:
    """What the engine says of one job: a Ray job status (or "MISSING") and its message."""

    status: str
    message: str = ""
    exit_code: int | None = None
    #: The engine gave up on the job before starting it only because it waited too long for
    #: resources (Ray fails a job PENDING longer than its start timeout, 15 min by default):
    #: the registry hands such a job over again instead of failing it.
    start_timed_out: bool = False

    @property
    def final(self) -> bool:
        """The engine has finished with the job (or no longer knows it)."""
        return self.status in ENGINE_FINAL or self.status == "MISSING"


#: What every job process gets unless the environment says otherwise (local and cluster jobs).
JOB_ENV_DEFAULTS = {"HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false"}


def job_environment(runs_root: Path, project_root: Path) -> dict[str, str]:
    """The environment variables a Ray job starts with: the forwarded settings, the runs root,
    the backend (so a protocol job fans its arms out on the same cluster) and PYTHONPATH."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k.startswith(_FORWARDED_PREFIXES) or k in _FORWARDED_NAMES
    }
    env = {**JOB_ENV_DEFAULTS, **env}
    env.update(PLENS_RUNS_DIR=str(runs_root), PYTHONUNBUFFERED="1", PYTHONPATH=str(project_root))
    return env


class Engine:
    """What the registry needs of a cluster engine (one per backend name, see
    `core.jobs.cluster.engine_for`):
    `check` that it answers, `submit` a job (returning the engine's id for it), its `state`,
    `stop` it, and what it kept of the output (`logs`). Errors are one-line `ClusterError`s."""

    address: str
    #: the engine's name in status lines ("Ray", "SLURM")
    label: str = "the cluster"
    #: what to suspect when the engine no longer knows a job it was given
    lost_hint: str = "was the cluster restarted?"

    def check(self) -> None:  # pragma: no cover - interface
        """Raise `ClusterError` unless the engine answers."""
        raise NotImplementedError

    def submit(
        self,
        engine_id: str,
        job_id: str,
        kind: str,
        device: str,
        runs_root: Path,
        log_path: Path,
        project_root: Path,
    ) -> str:  # pragma: no cover - interface
        """Start `python -m core job-run JOB_ID` there; returns the engine's id of the job
        (`engine_id` is a suggested name the engine may use or replace)."""
        raise NotImplementedError

    def state(self, engine_id: str) -> EngineState:  # pragma: no cover - interface
        """The job's state (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED or MISSING)."""
        raise NotImplementedError

    def stop(self, engine_id: str) -> None:  # pragma: no cover - interface
        """Ask the engine to stop the job (SIGTERM first, so it records "cancelled")."""
        raise NotImplementedError

    def logs(self, engine_id: str) -> str:
        """What the engine kept of the job's output besides log.txt ("" if nothing)."""
        return ""


def job_command(
    job_id: str, log_path: Path, project_root: Path, python_env: str, project_env: str
) -> tuple[str, Path]:
    """(the shell command a cluster job runs, the project folder it runs in): `cd PROJECT &&
    exec PYTHON -m core job-run JOB_ID >> LOG 2>&1`, with PYTHON and PROJECT from the engine's
    environment variables (`python_env`, `project_env`) where the nodes keep them elsewhere."""
    python = os.environ.get(python_env) or sys.executable
    project = Path(os.environ.get(project_env) or project_root)
    command = (
        f"cd {shlex.quote(str(project))} && exec {shlex.quote(python)} -m core job-run "
        f"{shlex.quote(job_id)} >> {shlex.quote(str(log_path))} 2>&1"
    )
    return command, project
