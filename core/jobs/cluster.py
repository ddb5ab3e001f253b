"""Where jobs run: the embedded local queue (default), a Ray cluster through the Ray Jobs API, or
SLURM through submitit (`core.jobs.slurm`). The `Engine` interface both engines implement, and
what they share, is `core.jobs.engine`.

The backend is a setting with three layers, the first one set wins:

1. per submission (`JobRegistry.submit(..., backend=...)`, the CLI's `--backend` / `--ray-address`);
2. the environment: `$PLENS_JOB_BACKEND` (``local``, ``ray`` or ``slurm``) and the address,
   `$PLENS_RAY_ADDRESS` for Ray, `$PLENS_SLURM_PARTITION` for SLURM;
3. the file `<runs root>/backend.json`, which the app's Home page and `python -m core backend`
   write;

else ``local``. Every job row records the backend it was submitted to, so changing the setting
never changes how an existing job is watched or cancelled.

A Ray job is the same `python -m core job-run JOB_ID` command the local queue starts, submitted
as a Ray job's entrypoint (`ray.job_submission.JobSubmissionClient`), with the job's output
appended to the run folder's `log.txt` as for a local job. That makes three demands on a
multi-node cluster, the same ones the paper-scale setups have anyway:

- the runs root (`$PLENS_RUNS_DIR`, else `$PLENS_CACHE_DIR/runs`) and the cache folder are on
  storage every node mounts at the same path (NFS, Lustre, a cloud file system): run folders,
  `jobs.sqlite`, the score store and the embedded model are read and written there;
- every node has the project and its virtual environment at the same path as the submitting
  machine (or set `$PLENS_RAY_PROJECT_DIR` and `$PLENS_RAY_PYTHON` to where they are there);
- the submitting machine reaches the head's dashboard port (8265 by default).

Ray schedules: a queued Ray job is handed to the cluster at once (no per-device cap; Ray holds it
PENDING until a node has `entrypoint_num_cpus` free CPUs, or a GPU for a CUDA job), so a
protocol's arms and a τ sweep fan out over the cluster. The registry still watches each job: it
asks Ray for the job's state where it would look at a local pid, so a job Ray reports FAILED or
STOPPED before it recorded its own end, or one Ray no longer knows (a restarted head), shows as
failed with Ray's reason and the log tail.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from core.config import JobConfig, help_meta
from core.errors import LensError
from core.io import read_json, write_json_atomic
from core.jobs.engine import (
    FAILED,
    PENDING,
    ClusterError,
    Engine,
    EngineState,
    job_command,
    job_environment,
)
from core.jobs.slurm import SlurmEngine

LOCAL, RAY, SLURM = "local", "ray", "slurm"
BACKENDS = (LOCAL, RAY, SLURM)
BACKEND_ENV = "PLENS_JOB_BACKEND"
ADDRESS_ENV = "PLENS_RAY_ADDRESS"
PARTITION_ENV = "PLENS_SLURM_PARTITION"
#: Where each cluster backend's address comes from when no submission names one: for SLURM the
#: "address" is the partition (empty: the cluster's default partition).
ADDRESS_ENVS = {RAY: ADDRESS_ENV, SLURM: PARTITION_ENV}
CPUS_ENV = "PLENS_RAY_CPUS_PER_JOB"
PYTHON_ENV = "PLENS_RAY_PYTHON"
PROJECT_ENV = "PLENS_RAY_PROJECT_DIR"
SETTING_FILE = "backend.json"
DEFAULT_RAY_ADDRESS = "http://127.0.0.1:8265"


@dataclass(frozen=True)
class BackendSetting:
    """Which backend new jobs go to: the Ray address for ``ray``, the partition for ``slurm``
    (None: the cluster's default partition)."""

    name: str = LOCAL
    address: str | None = None

    def describe(self) -> str:
        """ "the local queue", "Ray at http://…" or "SLURM (partition gpu)"."""
        if self.name == RAY:
            return f"Ray at {self.address}"
        if self.name == SLURM:
            where = f"partition {self.address}" if self.address else "the default partition"
            return f"SLURM ({where})"
        return "the local queue"


@dataclass
class BackendConfig(JobConfig):
    """``python -m core backend [NAME] [--address A]``: with a name, set where queued jobs run
    (the cluster checked first); without, show it."""

    COMMAND: ClassVar[str] = "backend"
    LABEL: ClassVar[str] = "backend"

    name: str | None = field(
        default=None, metadata=help_meta("set this backend", positional=True, choices=BACKENDS)
    )
    address: str | None = field(
        default=None,
        metadata=help_meta(
            "ray: the dashboard address (host:port or URL); slurm: the partition (default: "
            "the cluster's default partition)",
            aliases=("--partition",),
            metavar="ADDRESS",
        ),
    )

    def __post_init__(self) -> None:
        if self.name is None and self.address:
            raise LensError(
                "--address goes with a backend name: `backend ray --address HOST:PORT` or "
                "`backend slurm --partition NAME`."
            )


def normalise_address(address: str | None) -> str:
    """A Ray dashboard address as a URL: "host:port" gets "http://"; empty gives the default."""
    address = (address or "").strip() or DEFAULT_RAY_ADDRESS
    if "://" not in address:
        address = "http://" + address
    return address.rstrip("/")


def make_setting(name: str | None, address: str | None = None) -> BackendSetting:
    """A checked setting: the name is one of `BACKENDS`; ``ray`` gets a URL address, ``slurm``
    a partition name (or None for the default one)."""
    name = (name or LOCAL).strip().lower()
    if name not in BACKENDS:
        raise ClusterError(f"Unknown job backend '{name}' (known: {', '.join(BACKENDS)}).")
    if name == LOCAL:
        return BackendSetting(LOCAL)
    if name == SLURM:
        partition = (address or "").strip()
        if any(c.isspace() for c in partition):
            raise ClusterError(f"A SLURM partition name has no spaces (got {partition!r}).")
        return BackendSetting(SLURM, partition or None)
    return BackendSetting(RAY, normalise_address(address))


def saved_setting(root: Path) -> BackendSetting:
    """The setting kept in `<root>/backend.json` (local when absent or unreadable)."""
    data = read_json(Path(root) / SETTING_FILE)
    if not isinstance(data, dict):
        return BackendSetting(LOCAL)
    try:
        return make_setting(data.get("backend"), data.get("address"))
    except ClusterError:
        return BackendSetting(LOCAL)


def save_setting(root: Path, setting: BackendSetting) -> Path:
    """Keep the setting for the app and the CLI (atomic write)."""
    path = Path(root) / SETTING_FILE
    write_json_atomic(path, {"backend": setting.name, "address": setting.address})
    return path


def current_setting(
    root: Path, name: str | None = None, address: str | None = None
) -> BackendSetting:
    """The backend new jobs go to: `name` / `address` if given, else the environment, else the
    saved file, else local."""
    name = name or os.environ.get(BACKEND_ENV, "").strip()
    if name:
        key = name.strip().lower()
        fallback = os.environ.get(ADDRESS_ENVS.get(key, ""), "")
        if not address and not fallback:  # the saved address of the same backend, if any
            saved = saved_setting(root)
            fallback = (saved.address or "") if saved.name == key else ""
        return make_setting(name, address or fallback)
    saved = saved_setting(root)
    if address and saved.name != LOCAL:
        return make_setting(saved.name, address)
    return saved


# --------------------------------------------------------------------------- Ray


def _client(address: str) -> Any:
    """A Ray Jobs client; a cluster that does not answer is a one-line `ClusterError`."""
    try:
        from ray.job_submission import JobSubmissionClient  # lazy: heavy optional
    except ImportError:  # ray is in requirements.txt, but optional in the package (an extra)
        raise ClusterError(
            'The ray backend needs Ray: pip install "perplexity-lens[cluster]".'
        ) from None
    try:
        return JobSubmissionClient(address)
    except (ConnectionError, RuntimeError, ValueError, OSError) as exc:
        raise ClusterError(
            f"The Ray cluster at {address} does not answer ({_first(exc)}); start it "
            "(`ray start --head`) or set the job backend to local."
        ) from None


def job_resources(kind: str, device: str) -> dict[str, float]:
    """What a job asks Ray for: a coordinating protocol job nothing (it waits on its arms),
    others `$PLENS_RAY_CPUS_PER_JOB` CPUs (default 1), plus one GPU on CUDA."""
    if kind == "protocol":
        return {"entrypoint_num_cpus": 0}
    raw = os.environ.get(CPUS_ENV, "1")
    try:
        cpus = float(raw)
    except ValueError:
        raise ClusterError(f"{CPUS_ENV} must be a number, got {raw!r}.") from None
    out = {"entrypoint_num_cpus": cpus}
    if device.startswith("cuda"):
        out["entrypoint_num_gpus"] = 1
    return out


def engine_for(backend: str, address: str | None) -> Engine:
    """The engine of a cluster backend at `address`."""
    if backend == RAY:
        return RayEngine(address or "")
    if backend == SLURM:
        return SlurmEngine(address)
    raise ClusterError(
        f"No cluster engine for backend '{backend}' (known: {', '.join(BACKENDS[1:])})."
    )


def check_setting(setting: BackendSetting) -> None:
    """Raise a one-line `ClusterError` unless the setting's engine answers (local always does)."""
    if setting.name != LOCAL:
        engine_for(setting.name, setting.address).check()


class RayEngine(Engine):
    """The Ray Jobs API of one cluster (its dashboard address)."""

    label = "Ray"
    lost_hint = "was its head restarted?"

    def __init__(self, address: str) -> None:
        self.address = normalise_address(address)
        self._jobs: Any = None

    @property
    def client(self) -> Any:
        """The connected client (connecting on first use; `ClusterError` if it does not answer)."""
        if self._jobs is None:
            self._jobs = _client(self.address)
        return self._jobs

    def check(self) -> None:
        """Raise `ClusterError` (one line) unless the cluster answers."""
        _ = self.client

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
        """Hand `python -m core job-run JOB_ID` to Ray as job `engine_id`; output goes to
        `log_path` (the run folder's log.txt)."""
        entrypoint, project = job_command(job_id, log_path, project_root, PYTHON_ENV, PROJECT_ENV)
        try:
            return self.client.submit_job(
                entrypoint=entrypoint,
                submission_id=engine_id,
                runtime_env={"env_vars": job_environment(runs_root, project)},
                metadata={"perplexity_lens_job": job_id, "kind": kind},
                **job_resources(kind, device),
            )
        except ClusterError:
            raise
        except Exception as exc:  # noqa: BLE001 - Ray raises RuntimeError / ConnectionError
            raise ClusterError(
                f"Ray at {self.address} refused job {job_id}: {_first(exc)}"
            ) from None

    def state(self, engine_id: str) -> EngineState:
        """The job's state; "MISSING" when the cluster answers but does not know the job."""
        try:
            info = self.client.get_job_info(engine_id)
        except ClusterError:
            raise
        except Exception as exc:  # noqa: BLE001
            text = str(exc)
            if "does not exist" in text or "404" in text:
                return EngineState(
                    "MISSING", f"Ray at {self.address} does not know job {engine_id}"
                )
            raise ClusterError(
                f"The Ray cluster at {self.address} does not answer ({_first(exc)}); the job's "
                "state is unknown until it does"
            ) from None
        status = str(getattr(info.status, "value", info.status))
        message = info.message or ""
        if status == PENDING:  # Ray's long "may be waiting for ..." text, in a few words
            message = "waiting for free CPUs / GPUs or its runtime environment"
        # "Job supervisor actor failed to start within 900.0 seconds" ($RAY_JOB_START_TIMEOUT_
        # SECONDS on the head): a queue longer than the timeout, not a broken job
        timed_out = status == FAILED and "failed to start within" in message
        return EngineState(status, message, getattr(info, "driver_exit_code", None), timed_out)

    def stop(self, engine_id: str) -> None:
        """Ask Ray to stop the job (SIGTERM to its process, SIGKILL a few seconds later)."""
        try:
            self.client.stop_job(engine_id)
        except ClusterError:
            raise
        except Exception as exc:  # noqa: BLE001
            if "does not exist" not in str(exc):
                raise ClusterError(
                    f"Ray at {self.address} could not stop {engine_id}: {_first(exc)}"
                ) from None

    def logs(self, engine_id: str) -> str:
        """What Ray kept of the job's output (the entrypoint redirects to log.txt, so this holds
        only what Ray itself printed, e.g. a runtime-environment failure)."""
        try:
            return self.client.get_job_logs(engine_id)
        except Exception:  # noqa: BLE001 - best effort, for an error message
            return ""


def _first(exc: BaseException) -> str:
    """A short reason: "connection refused" for the usual refusal, else the first line, cut."""
    text = str(exc).strip()
    if "Connection refused" in text or "Errno 111" in text:
        return "connection refused"
    if "timed out" in text.lower():
        return "timed out"
    line = (text.splitlines()[0] if text else type(exc).__name__).rstrip(".")
    return line if len(line) <= 160 else line[:157] + "..."
