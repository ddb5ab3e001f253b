"""Jobs on a real SLURM cluster: a single-node slurmctld + slurmd (Debian's slurm-wlm, munge
authentication) started by this module as root, jobs through submitit's sbatch. Train and eval
jobs run there and the registry shows them like local ones (the engine id is SLURM's job id);
cancel goes through scancel; a job whose process dies, one cancelled from outside and one the
controller no longer knows show as failed with the engine's reason; a controller that does not
answer is a one-line error at submit time; the protocol fans its arms out on SLURM; the Start
page checks a partition before saving it.

Locally the module is skipped when slurm-wlm is missing or we are not root (the daemons run as
root); in CI (CI=true) either fails: scripts/setup.sh --dev installs slurm-wlm as root."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from core.eval.config import eval_job_config
from core.jobs.cluster import SLURM, ClusterError, current_setting, make_setting
from core.jobs.registry import CANCELLED, FAILED, RUNNING, SUCCEEDED, JobRegistry
from core.jobs.slurm import SlurmEngine, parse_fields
from tests import leftovers
from tests.factories import tiny_protocol_config
from tests.job_fixtures import BACKEND_ENV_VARS, free_port, train_config, wait_for, write_rows

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SBIN = Path("/usr/sbin")
SLURMCTLD = shutil.which("slurmctld") or str(SBIN / "slurmctld")
SLURMD = shutil.which("slurmd") or str(SBIN / "slurmd")
MUNGED = shutil.which("munged") or str(SBIN / "munged")
# One node with 4 CPU slots on whatever the machine has (config_overrides: slurmd trusts the
# config, not the hardware), so a protocol's coordinator (1 CPU) and its two arms fit at once.
CONF = """\
ClusterName=plenstest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation={dir}/{state}
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/log/slurmctld.log
SlurmdLogFile={dir}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
MinJobAge=3600
KillWait=5
FirstJobId={first_job_id}
SlurmdParameters=config_overrides
NodeName=localhost CPUs=4 RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _require_slurm() -> None:
    """Skip (locally) or fail (CI) unless this machine can run a SLURM cluster."""
    why = None
    if not Path(SLURMCTLD).exists() or not Path(SLURMD).exists() or not shutil.which("sbatch"):
        why = "slurm-wlm (slurmctld, slurmd, sbatch) is not installed"
    elif os.geteuid() != 0:
        why = "the single-node SLURM cluster these tests start runs its daemons as root"
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"{why}; scripts/setup.sh --dev installs slurm-wlm when run as root")
        pytest.skip(f"{why} (scripts/setup.sh --dev installs slurm-wlm when run as root)")


def _munge_answers() -> bool:
    try:
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        out = subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return cred.returncode == 0 and out.returncode == 0


class SlurmCluster:
    """slurmctld and slurmd in the foreground (-D) on free ports, state and logs in `folder`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ctld_port, self.slurmd_port = free_port(), free_port()
        self.conf = folder / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.restarts = 0
        (folder / "log").mkdir(parents=True, exist_ok=True)
        (folder / "spool").mkdir(exist_ok=True)

    def write_conf(self) -> None:
        state = f"state{self.restarts}"  # a restart without the old state forgets every job
        (self.folder / state).mkdir(exist_ok=True)
        self.conf.write_text(
            CONF.format(
                dir=self.folder,
                state=state,
                ctld_port=self.ctld_port,
                slurmd_port=self.slurmd_port,
                first_job_id=1 + 10000 * self.restarts,
            )
        )

    def start(self) -> None:
        self.write_conf()
        env = dict(os.environ, SLURM_CONF=str(self.conf))
        for exe in (SLURMCTLD, SLURMD):
            out = open(self.folder / "log" / f"{Path(exe).name}.out", "ab")  # noqa: SIM115
            self.procs.append(
                subprocess.Popen([exe, "-D", "-f", str(self.conf)], stdout=out, stderr=out, env=env)
            )
            out.close()
        deadline = time.monotonic() + 60
        while True:  # the node registers a few seconds after the daemons start
            state = subprocess.run(
                ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=env, timeout=60
            ).stdout.strip()
            if state == "idle":
                return
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                logs = "".join(
                    p.read_text(errors="replace")[-1500:] for p in (self.folder / "log").iterdir()
                )
                raise AssertionError(f"the SLURM node did not come up (sinfo: {state!r})\n{logs}")
            time.sleep(0.5)

    def stop(self, cancel: bool = True) -> None:
        env = dict(os.environ, SLURM_CONF=str(self.conf))
        if cancel:  # every job on this test cluster is ours
            subprocess.run(["scancel", "--user", "root"], capture_output=True, env=env, timeout=60)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                q = subprocess.run(
                    ["squeue", "-h", "-o", "%i"],
                    capture_output=True,
                    text=True,
                    env=env,
                    timeout=60,
                )
                if q.returncode != 0 or not q.stdout.strip():
                    break
                time.sleep(0.5)
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.procs = []
        # The node goes down with its daemons: a job step (slurmstepd, its script and the job)
        # outlives slurmd, waiting forever to report to it; every process that names this
        # cluster's folder (SLURM_CONF, the spool) is killed, as a power-off would.
        leftovers.stop_processes(leftovers.processes_mentioning(str(self.folder)), grace=0)

    def restart_without_state(self) -> None:
        """Stop the daemons (jobs are not cancelled) and start them again with an empty state
        folder: the controller no longer knows any earlier job."""
        self.stop(cancel=False)
        self.restarts += 1
        self.start()


@pytest.fixture(scope="module")
def slurm_conf_env():
    """SLURM_CONF for this module's processes (the registry, the jobs it submits, the CLI)."""
    _require_slurm()
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def cluster(slurm_conf_env):
    started_munge = None
    if not _munge_answers():
        run = Path("/run/munge")
        run.mkdir(parents=True, exist_ok=True)
        shutil.chown(run, "munge", "munge")
        subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", MUNGED], check=True, timeout=30)
        assert _munge_answers(), "munged did not start (is /etc/munge/munge.key there?)"
        with contextlib.suppress(OSError, ValueError):
            started_munge = int((run / "munged.pid").read_text().strip())
    # a short temp folder: slurmd's step sockets live in its spool (paths are limited to 107 bytes)
    temp = Path(tempfile.mkdtemp(prefix=f"plslurm-{leftovers.session_id()}-", dir="/tmp"))
    slurm = SlurmCluster(temp)
    slurm_conf_env.setenv("SLURM_CONF", str(slurm.conf))
    slurm.start()
    yield slurm
    slurm.stop()
    shutil.rmtree(temp, ignore_errors=True)
    if started_munge:
        with contextlib.suppress(ProcessLookupError):
            os.kill(started_munge, signal.SIGTERM)


def scontrol_job(engine_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", engine_id],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return parse_fields(out.stdout)


@pytest.fixture
def runs(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    monkeypatch.setenv("PLENS_RUNS_DIR", str(root))
    for name in BACKEND_ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    return root


@pytest.fixture
def data_file(tmp_path):
    return write_rows(tmp_path / "train.jsonl")


def test_the_slurm_setting_and_an_unreachable_controller_is_one_line(
    slurm_conf_env, runs, tmp_path, monkeypatch
):
    """No cluster here: SLURM_CONF names a controller port nothing listens on."""
    assert make_setting("slurm").describe() == "SLURM (the default partition)"
    assert current_setting(runs, "slurm", "gpu") == make_setting("slurm", "gpu")
    monkeypatch.setenv("PLENS_JOB_BACKEND", "slurm")
    monkeypatch.setenv("PLENS_SLURM_PARTITION", "debug")
    assert current_setting(runs).describe() == "SLURM (partition debug)"
    monkeypatch.delenv("PLENS_JOB_BACKEND")

    dead = tmp_path / "dead"
    dead.mkdir()
    conf = CONF.format(
        dir=dead, state="state", ctld_port=free_port(), slurmd_port=free_port(), first_job_id=1
    )
    (dead / "slurm.conf").write_text(conf)
    monkeypatch.setenv("SLURM_CONF", str(dead / "slurm.conf"))
    registry = JobRegistry(runs)
    started = time.monotonic()
    with pytest.raises(ClusterError, match="The SLURM controller does not answer") as info:
        registry.submit("train", {}, device="cpu", backend="slurm")
    assert "\n" not in str(info.value) and time.monotonic() - started < 10
    assert registry.list() == []  # nothing was written
    assert [p.name for p in runs.iterdir() if p.is_dir()] == []

    out = subprocess.run(
        [sys.executable, "-m", "core", "train", "--submit", "--task", "mbpp", "--backend", "slurm"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: The SLURM controller does not")
    assert "Traceback" not in out.stderr


def test_train_and_eval_jobs_run_on_slurm_and_show_in_the_registry(
    cluster, runs, tiny_model_dir, data_file
):
    with pytest.raises(ClusterError, match=r"SLURM has no partition 'nope' \(partitions: debug"):
        JobRegistry(runs).submit("train", {}, device="cpu", backend="slurm", address="nope")

    registry = JobRegistry(runs)
    train = registry.submit(
        "train",
        train_config(tiny_model_dir, data_file),
        device="cpu",
        label="on slurm",
        backend="slurm",
        address="debug",
    )
    evaluation = registry.submit(
        "eval",
        eval_job_config(str(tiny_model_dir), suite="tiny", limit=1, device="cpu"),
        device="cpu",
        backend="slurm",
    )
    assert train.where == "slurm debug" and evaluation.where == "slurm"
    for job in (train, evaluation):
        assert job.backend == SLURM and job.engine_id and job.engine_id.isdigit()
        fields = scontrol_job(job.engine_id)  # the engine id is SLURM's job id
        assert fields["JobName"].startswith(f"plens-{job.id}-a1-")
        assert fields["Partition"] == "debug" and fields["NumCPUs"] == "1"
        assert f"perplexity_lens_job={job.id}" in fields["Comment"]

    engine = SlurmEngine()
    for job in (train, evaluation):
        done = registry.wait(job.id, timeout=300)
        assert done.status == SUCCEEDED, done.error
        engine_id = done.engine_id  # SLURM sees the job end a moment later
        wait_for(lambda e=engine_id: engine.state(e).final, 60, "SLURM to see the end")
        assert engine.state(engine_id).status == "SUCCEEDED"
        assert scontrol_job(engine_id)["JobState"] == "COMPLETED"
    assert (train.path / "adapter").is_dir() and (train.path / "summary.json").is_file()
    assert (evaluation.path / "eval.json").is_file()
    log = (train.path / "log.txt").read_text()
    assert "submitting job" in log and "done: step 2" in log  # the job's output, as locally
    assert (train.path / "slurm" / f"{train.engine_id}_submission.sh").is_file()

    out = subprocess.run(
        [sys.executable, "-m", "core", "jobs", "list"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PLENS_RUNS_DIR=str(runs)),
    )
    assert out.returncode == 0 and "slurm debug" in out.stdout, out.stdout


def test_cancel_kill_and_an_outside_scancel(cluster, runs, tiny_model_dir, data_file):
    """Three long trainings side by side: one cancelled through the registry (scancel, the job
    records "cancelled"), one whose process is SIGKILLed (an out-of-memory kill, say) and one
    cancelled from outside with `scancel`: both of those show as failed with SLURM's reason."""
    registry = JobRegistry(runs)
    cfg = train_config(tiny_model_dir, data_file, max_steps=5000)
    cancelled, killed, outside = (
        registry.submit("train", cfg, device="cpu", backend="slurm") for _ in range(3)
    )

    def training(job):
        metrics = job.path / "metrics.jsonl"
        return metrics.exists() and "step" in metrics.read_text()

    wait_for(lambda: all(training(j) for j in (cancelled, killed, outside)), 240, "training")

    done = registry.cancel(cancelled.id, grace=5)
    assert done.status == CANCELLED, (done.status, done.error)
    assert "job cancelled (SIGTERM)" in (cancelled.path / "log.txt").read_text()
    engine = SlurmEngine()
    assert wait_for(lambda: engine.state(cancelled.engine_id).final, 60, "SLURM to stop it")
    assert engine.state(cancelled.engine_id).status in ("STOPPED", "FAILED")

    os.kill(registry.get(killed.id).pid, signal.SIGKILL)
    subprocess.run(["scancel", outside.engine_id], check=True, timeout=60)
    for job, state in ((killed, "FAILED"), (outside, "STOPPED")):
        end = wait_for(lambda j=job: (r := registry.get(j.id)).status != RUNNING and r, 120, state)
        assert end.status == FAILED, (end.status, end.error)
        assert end.error.startswith(f"the cluster reports the job {state}: SLURM job "), end.error
        assert "last lines of log.txt" in end.error
    assert "NonZeroExitCode" in registry.get(killed.id).error
    assert "FailedJobError" in engine.logs(killed.engine_id)  # submitit's launcher saw it fail
    assert "CANCELLED" in registry.get(outside.id).error
    assert "without a cancel from the registry" in (outside.path / "log.txt").read_text()


def test_the_protocol_fans_its_arms_out_on_slurm(cluster, runs, tiny_model_dir):
    """GT and STM-25% on the tiny model as one protocol job on SLURM: the coordinator holds one
    CPU slot and the two arms run as SLURM jobs side by side, results and report as locally."""
    from core.study.protocol import RESULTS_JSON, protocol_folder

    config = tiny_protocol_config(tiny_model_dir)
    registry = JobRegistry(runs)
    folder = protocol_folder(config, name="proto-slurm")
    job = registry.submit(
        "protocol", config.to_dict(), device="cpu", run_dir=folder, backend="slurm"
    )
    done = registry.wait(job.id, timeout=400)
    assert done.status == SUCCEEDED, done.error

    results = json.loads((folder / RESULTS_JSON).read_text())
    assert set(results["arms"]) == {"gt", "stm_share"}
    arms = sorted((j for j in registry.list() if j.id != job.id), key=lambda j: j.started)
    assert len(arms) == 2 and {j.kind for j in arms} == {"train"}
    assert all(j.backend == SLURM and j.engine_id.isdigit() for j in arms)
    assert all(j.status == SUCCEEDED for j in arms), [j.error for j in arms]
    assert arms[1].started < arms[0].finished  # side by side, not one after the other
    coordinator = done.engine_id  # SLURM sees its end a moment after it recorded it
    wait_for(lambda: scontrol_job(coordinator)["JobState"] == "COMPLETED", 60, "COMPLETED")
    assert (folder / "report.html").is_file()


def test_the_start_page_checks_a_slurm_partition_before_saving_it(cluster, runs, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.chdir(ROOT)
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    at.radio(key="backend-name").set_value("slurm").run()
    at.text_input(key="backend-partition").set_value("nope").run()
    at.button(key="backend-save").click().run()
    assert any("no partition 'nope'" in e.value for e in at.error), [e.value for e in at.error]
    assert current_setting(runs).name == "local"  # nothing saved
    at.text_input(key="backend-partition").set_value("debug").run()
    at.button(key="backend-save").click().run()
    assert any("SLURM (partition debug)" in s.value for s in at.success)
    assert current_setting(runs) == make_setting("slurm", "debug")

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "core", *args],
            cwd=ROOT,
            text=True,
            capture_output=True,
            timeout=120,
            env=dict(os.environ, PLENS_RUNS_DIR=str(runs)),
        )

    out = cli("backend", "slurm")  # `python -m core backend` checks and saves the same way
    assert out.returncode == 0 and "SLURM (the default partition)" in out.stdout, out.stderr
    assert current_setting(runs) == make_setting("slurm")
    out = cli("backend", "slurm", "--partition", "nope")
    assert out.returncode == 2 and out.stderr.startswith("error: SLURM has no partition 'nope'")
    out = cli("train", "--submit", "--task", "mbpp", "--backend", "slurm", "--ray-address", "x:1")
    assert out.returncode == 2 and "--ray-address goes with --backend ray" in out.stderr


def test_a_job_the_restarted_controller_no_longer_knows_is_failed_as_lost(
    cluster, runs, tiny_model_dir, data_file
):
    """Last in this module: it restarts the cluster without its state. While the controller is
    down, the job keeps its status with a note; once it answers and does not know the job, the
    job is failed as lost."""
    registry = JobRegistry(runs)
    job = registry.submit(
        "train",
        train_config(tiny_model_dir, data_file, max_steps=5000),
        device="cpu",
        backend="slurm",
    )
    running = wait_for(
        lambda: (j := registry.get(job.id)).status == RUNNING and j.pid and j, 240, "a pid"
    )
    cluster.stop(cancel=False)
    with contextlib.suppress(ProcessLookupError):
        os.kill(running.pid, signal.SIGKILL)  # the node went down with the controller
    down = registry.get(job.id)
    assert down.status == RUNNING and "SLURM controller does not answer" in down.message
    cluster.restart_without_state()
    lost = wait_for(lambda: (j := registry.get(job.id)).status != RUNNING and j, 60, "lost")
    assert lost.status == FAILED and lost.error.startswith("lost by the cluster"), lost.error
    assert f"does not know job {job.engine_id}" in lost.error
