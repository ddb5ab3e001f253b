"""Jobs on a SLURM cluster, submitted through submitit (`SlurmEngine`, backend ``slurm``).

A SLURM job is the same `python -m core job-run JOB_ID` the local queue and Ray start: submitit
writes an sbatch script whose only step runs `bash -c "cd PROJECT && exec PYTHON -m core job-run
ID >> RUN/log.txt 2>&1"` (a `submitit.helpers.CommandFunction`; submitit's own launcher log and
pickles go to `RUN/slurm/`). The job inherits the submitting environment (sbatch's default
``--export=ALL``) with the settings `core.jobs.engine.job_environment` names exported on top, so
a protocol job fans its arms out on the same cluster (`SLURM_CONF` included).

The engine's id of a job is SLURM's job id. The setting's address is the partition (None: the
cluster's default). What each job asks for: `$PLENS_SLURM_CPUS_PER_JOB` CPUs (default 1) and
``--gres=gpu:1`` when its device is CUDA; the protocol's coordinating job asks for 1 CPU (SLURM
cannot allocate none) and holds it while its arms run. No time limit is asked unless
`$PLENS_SLURM_TIME_MIN` is set (the partition's default applies).

No accounting database is needed: `sacct` (and so submitit's own job state) does not work
without slurmdbd, so the state comes from `scontrol show job -o ID`, which the controller
answers while it remembers the job (`MinJobAge`, 300 s by default, after it ended). A finished
job the controller has forgotten is "MISSING" to the registry, which matters only for a job that
never recorded its own end. Cancel is `scancel --signal=TERM --full` (the job process records
"cancelled") followed by `scancel` (SIGKILL after the cluster's `KillWait`).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from core.jobs.engine import (
    FAILED,
    PENDING,
    RUNNING,
    STOPPED,
    SUCCEEDED,
    ClusterError,
    Engine,
    EngineState,
    job_command,
    job_environment,
)

CPUS_ENV = "PLENS_SLURM_CPUS_PER_JOB"
TIME_ENV = "PLENS_SLURM_TIME_MIN"
PYTHON_ENV = "PLENS_SLURM_PYTHON"
PROJECT_ENV = "PLENS_SLURM_PROJECT_DIR"
COMMAND_TIMEOUT_S = 60.0

#: SLURM job states (squeue/scontrol JobState) as the Ray-style states the registry reads.
STATES = {
    "PENDING": PENDING,
    "CONFIGURING": PENDING,
    "REQUEUED": PENDING,
    "REQUEUE_FED": PENDING,
    "REQUEUE_HOLD": PENDING,
    "RESV_DEL_HOLD": PENDING,
    "RUNNING": RUNNING,
    "COMPLETING": RUNNING,  # the job's processes are being cleaned up; its end follows
    "SUSPENDED": RUNNING,
    "STOPPED": RUNNING,  # SIGSTOPped by SLURM, resumable
    "RESIZING": RUNNING,
    "SIGNALING": RUNNING,
    "STAGE_OUT": RUNNING,
    "COMPLETED": SUCCEEDED,
    "CANCELLED": STOPPED,
    "PREEMPTED": STOPPED,
    "FAILED": FAILED,
    "TIMEOUT": FAILED,
    "NODE_FAIL": FAILED,
    "OUT_OF_MEMORY": FAILED,
    "BOOT_FAIL": FAILED,
    "DEADLINE": FAILED,
    "SPECIAL_EXIT": FAILED,
    "REVOKED": FAILED,
}

_FIELD = re.compile(r"(?:^|\s)([A-Za-z][A-Za-z0-9_/:]*)=(\S*)")


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a SLURM client command; slurm not installed is a one-line `ClusterError`."""
    try:
        return subprocess.run(
            args, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
        )
    except FileNotFoundError:
        raise ClusterError(
            f"The slurm backend needs SLURM's client commands ({args[0]} not found): install "
            "slurm-client (Debian: slurm-wlm) on this machine, or set the job backend to local."
        ) from None
    except subprocess.TimeoutExpired:
        raise ClusterError(
            f"The SLURM controller does not answer ({args[0]} timed out after "
            f"{COMMAND_TIMEOUT_S:.0f} s)."
        ) from None


def _first_line(text: str) -> str:
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line if len(line) <= 200 else line[:197] + "..."


def parse_fields(text: str) -> dict[str, str]:
    """The KEY=VALUE fields of one `scontrol show ... -o` line."""
    return {m.group(1): m.group(2) for m in _FIELD.finditer(text)}


def exit_code(value: str) -> int | None:
    """SLURM's "CODE:SIGNAL" as one exit status (128 + signal when a signal ended it)."""
    code, _, sig = value.partition(":")
    try:
        return 128 + int(sig) if sig and int(sig) else int(code)
    except ValueError:
        return None


def cpus_per_job(kind: str) -> int:
    """CPUs a job asks SLURM for: `$PLENS_SLURM_CPUS_PER_JOB` (default 1); the protocol's
    coordinating job 1 (it waits on its arms, but SLURM cannot allocate zero CPUs)."""
    if kind == "protocol":
        return 1
    raw = os.environ.get(CPUS_ENV, "1").strip()
    try:
        cpus = int(raw)
    except ValueError:
        cpus = 0
    if cpus < 1:
        raise ClusterError(f"{CPUS_ENV} must be a whole number of CPUs, 1 or more (got {raw!r}).")
    return cpus


def _time_limit() -> int | None:
    raw = os.environ.get(TIME_ENV, "").strip()
    if not raw:
        return None
    try:
        minutes = int(raw)
    except ValueError:
        minutes = -1
    if minutes < 0:
        raise ClusterError(f"{TIME_ENV} must be a whole number of minutes (got {raw!r}).")
    return minutes


def _executor_class() -> Any:
    """submitit's SlurmExecutor, adjusted: no `--time` unless one is configured (submitit always
    asks 5 minutes), and sbatch started without the `SLURM_*` variables of an enclosing job (a
    protocol job submitting its arms), which would otherwise leak into the new job."""
    try:
        import submitit  # lazy: heavy optional
    except ImportError:  # submitit is in requirements.txt, but optional in the package (an extra)
        raise ClusterError(
            'The slurm backend needs submitit: pip install "perplexity-lens[cluster]".'
        ) from None

    class Executor(submitit.SlurmExecutor):  # type: ignore[misc]
        ask_time = False

        def _make_submission_file_text(self, command: str, uid: str) -> str:
            text = super()._make_submission_file_text(command, uid)
            if self.ask_time:
                return text
            return "\n".join(ln for ln in text.split("\n") if not ln.startswith("#SBATCH --time="))

        def _make_submission_command(self, submission_file_path: Path) -> list[str]:
            inherited = sorted(
                k for k in os.environ if k.startswith("SLURM_") and k != "SLURM_CONF"
            )
            unset = [arg for k in inherited for arg in ("-u", k)]
            return ["env", *unset, "sbatch", str(submission_file_path)]

    return Executor


class SlurmEngine(Engine):
    """One SLURM cluster (the one `$SLURM_CONF` or /etc/slurm/slurm.conf names), jobs on one
    partition (`address`; empty: the default partition)."""

    label = "SLURM"
    lost_hint = "was the controller restarted without its state, or did it forget the job?"

    #: a controller that answered this recently is not pinged again: one ping serves a whole
    #: reconcile pass over many jobs instead of one subprocess per job
    PING_FRESH_S = 2.0

    def __init__(self, partition: str | None = None) -> None:
        self.partition = (partition or "").strip() or None
        self.address = self.partition or ""
        self._answered_at: float | None = None

    def _where(self) -> str:
        return f"partition {self.partition}" if self.partition else "the default partition"

    def ping(self) -> None:
        """Raise a one-line `ClusterError` unless the controller answers (`scontrol ping` gives
        its answer at once, where other commands retry for a while)."""
        now = time.monotonic()
        if self._answered_at is not None and now - self._answered_at < self.PING_FRESH_S:
            return
        out = _run(["scontrol", "ping"])
        text = (out.stdout + out.stderr).strip()
        if out.returncode != 0 or " is UP" not in text:
            said = _first_line(text) or f"scontrol ping exited {out.returncode}"
            conf = os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")
            raise ClusterError(
                f"The SLURM controller does not answer ({said}; config {conf}); start "
                "slurmctld or set the job backend to local."
            )
        self._answered_at = now

    def check(self) -> None:
        """Raise `ClusterError` (one line) unless the controller answers and the partition, if
        one is named, exists."""
        self.ping()
        if self.partition:
            out = _run(["scontrol", "show", "partition", "-o", self.partition])
            if out.returncode != 0 or f"PartitionName={self.partition}" not in out.stdout:
                known = _run(["sinfo", "-h", "-o", "%R"]).stdout.split()
                raise ClusterError(
                    f"SLURM has no partition '{self.partition}' (partitions: "
                    f"{', '.join(sorted(set(known))) or 'none'})."
                )

    def submit(
        self,
        engine_id: str,
        job_id: str,
        kind: str,
        device: str,
        runs_root: Path,
        log_path: Path,
        project_root: Path,
    ) -> str:
        """sbatch `python -m core job-run JOB_ID` (named `engine_id`) through submitit; returns
        SLURM's job id. Output goes to `log_path` (the run folder's log.txt)."""
        self.ping()
        command, project = job_command(job_id, log_path, project_root, PYTHON_ENV, PROJECT_ENV)
        python = os.environ.get(PYTHON_ENV) or sys.executable  # submitit's own launcher too
        env = job_environment(runs_root, project)
        params: dict[str, Any] = {
            "job_name": engine_id,
            "cpus_per_task": cpus_per_job(kind),
            "use_srun": False,  # one process, and it may submit jobs itself (a protocol)
            "comment": f"perplexity_lens_job={job_id},kind={kind}",
            "setup": [f"export {k}={shlex.quote(v)}" for k, v in sorted(env.items())],
            "additional_parameters": {"chdir": str(project)},
        }
        if self.partition:
            params["partition"] = self.partition
        if device.startswith("cuda") and kind != "protocol":
            params["gres"] = "gpu:1"
        minutes = _time_limit()
        if minutes is not None:
            params["time"] = minutes
        executor_class = _executor_class()  # first: without submitit, which extra to install
        import submitit  # lazy: heavy optional

        try:
            executor = executor_class(folder=log_path.parent / "slurm", python=python)
            executor.ask_time = minutes is not None
            executor.update_parameters(**params)
            job = executor.submit(submitit.helpers.CommandFunction(["/bin/bash", "-c", command]))
        except ClusterError:
            raise
        except Exception as exc:  # noqa: BLE001 - sbatch's refusal comes as FailedJobError etc.
            said = _first_line(str(exc)) or type(exc).__name__
            raise ClusterError(f"SLURM ({self._where()}) refused job {job_id}: {said}") from None
        return str(job.job_id)

    def _show(self, engine_id: str) -> dict[str, str] | None:
        """`scontrol show job -o ID` as fields; None when the controller does not know it."""
        self.ping()
        out = _run(["scontrol", "show", "job", "-o", engine_id])
        if out.returncode != 0:
            text = (out.stderr + out.stdout).strip()
            if "Invalid job id" in text:
                return None
            raise ClusterError(
                f"The SLURM controller does not answer ({_first_line(text)}); the job's state is "
                "unknown until it does"
            )
        return parse_fields(out.stdout.splitlines()[0] if out.stdout else "")

    def state(self, engine_id: str) -> EngineState:
        """The job's state from `scontrol show job` (no accounting needed); "MISSING" when the
        controller answers but does not know the job."""
        fields = self._show(engine_id)
        if fields is None:
            return EngineState("MISSING", f"the SLURM controller does not know job {engine_id}")
        raw = fields.get("JobState", "UNKNOWN")
        status = STATES.get(raw, RUNNING)  # an unknown state: keep watching
        reason = fields.get("Reason", "None")
        code = fields.get("ExitCode", "")
        if status == PENDING:
            return EngineState(status, f"SLURM job {engine_id} PENDING ({reason})")
        detail = [f"reason {reason}"] if reason not in ("None", "(null)", "") else []
        if code and status not in (RUNNING, PENDING):
            detail.append(f"exit code {code}")
        more = f" ({', '.join(detail)})" if detail else ""
        return EngineState(status, f"SLURM job {engine_id} {raw}{more}", exit_code(code))

    def stop(self, engine_id: str) -> None:
        """SIGTERM to the job's processes (batch script included, `--full`), so the job records
        "cancelled" itself, then `scancel`, which ends the job in SLURM (SIGKILL after the
        cluster's KillWait). A job SLURM has finished with, or no longer knows, is left alone."""
        self.ping()
        _run(["scancel", "--signal=TERM", "--full", engine_id])  # refused while pending: fine
        out = _run(["scancel", engine_id])
        text = (out.stderr + out.stdout).strip()
        if out.returncode != 0 and not any(
            s in text for s in ("Invalid job id", "already completing or completed")
        ):
            raise ClusterError(f"SLURM could not stop job {engine_id}: {_first_line(text)}")

    def logs(self, engine_id: str) -> str:
        """The tail of submitit's launcher output for the job (`RUN/slurm/ID_0_log.*`): the job's
        own output goes to log.txt, so this holds what SLURM or submitit printed."""
        try:
            fields = self._show(engine_id) or {}
        except ClusterError:
            return ""
        parts = []
        for key in ("StdErr", "StdOut"):
            path = fields.get(key, "")
            if path and (key == "StdErr" or path != fields.get("StdErr")):
                try:
                    parts.append(Path(path).read_text(errors="replace")[-4000:])
                except OSError:
                    continue
        return "\n".join(p for p in parts if p.strip())
