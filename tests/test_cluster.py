"""Jobs on a real Ray cluster: a head started on 127.0.0.1 by this module (`ray start --head`),
jobs through the Ray Jobs API. Train, eval and generate jobs run there and the registry shows
them like local ones; cancel goes through Ray; a job whose process dies, or that a restarted
head no longer knows, shows as failed with the engine's reason; a cluster that does not answer
is a one-line error at submit time; and the paper's protocol fans its arms out on the cluster
on the tiny model."""

from __future__ import annotations

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
from core.jobs.cluster import (
    RAY,
    ClusterError,
    RayEngine,
    current_setting,
    make_setting,
    save_setting,
)
from core.jobs.registry import CANCELLED, FAILED, RUNNING, SUCCEEDED, JobRegistry
from tests import leftovers
from tests.factories import tiny_protocol_config
from tests.job_fixtures import BACKEND_ENV_VARS, free_port, train_config, wait_for, write_rows

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
RAY_BIN = Path(sys.executable).with_name("ray")


#: The test head's CPU slots (logical: Ray does not check them against the cores): a protocol's
#: Self-Output generation and its two arms fit at once.
CPUS = 3


class RayHead:
    """A single-node Ray cluster on loopback, started and stopped with Ray's own CLI."""

    def __init__(self, temp_dir: Path) -> None:
        self.temp_dir = temp_dir
        self.port, self.dashboard, self.client_port = free_port(), free_port(), free_port()
        self.agent_port = free_port()  # Ray's default (52365) clashes with another head here
        self.address = f"http://127.0.0.1:{self.dashboard}"

    def start(self) -> None:
        cmd = [
            str(RAY_BIN),
            "start",
            "--head",
            "--node-ip-address",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            str(self.dashboard),
            "--ray-client-server-port",
            str(self.client_port),
            "--dashboard-agent-listen-port",
            str(self.agent_port),
            "--num-cpus",
            str(CPUS),
            "--include-dashboard",
            "true",
            "--disable-usage-stats",
            "--temp-dir",
            str(self.temp_dir),
        ]
        # Ray drops a job still PENDING after this many seconds (900 by default): short here,
        # so the hand-over-again path runs whenever a test queues more jobs than CPUs
        env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", RAY_JOB_START_TIMEOUT_SECONDS="8")
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=180)
        assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
        deadline = time.monotonic() + 60
        while True:  # the dashboard's job API answers a little after `ray start` returns
            try:
                RayEngine(self.address).client.list_jobs()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def stop(self) -> None:
        subprocess.run([str(RAY_BIN), "stop", "--force"], capture_output=True, timeout=120)
        # anything of this head that `ray stop` missed (its processes name the temp folder)
        leftovers.stop_processes(leftovers.processes_mentioning(str(self.temp_dir)))


@pytest.fixture(scope="module")
def ray_head():
    # a short temp folder: Ray's unix sockets live under it (paths are limited to 107 bytes)
    temp = Path(tempfile.mkdtemp(prefix=f"plray-{leftovers.session_id()}-", dir="/tmp"))
    head = RayHead(temp)
    head.start()
    yield head
    head.stop()
    shutil.rmtree(temp, ignore_errors=True)


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


def test_the_backend_setting_layers_and_an_unreachable_cluster_is_one_line(runs, monkeypatch):
    registry = JobRegistry(runs)
    assert current_setting(runs).name == "local"
    save_setting(runs, make_setting("ray", "127.0.0.1:9"))
    assert current_setting(runs).address == "http://127.0.0.1:9"  # the app's saved setting
    monkeypatch.setenv("PLENS_JOB_BACKEND", "local")
    assert current_setting(runs).name == "local"  # the environment wins over the file
    assert current_setting(runs, "ray", "10.0.0.1:8265").address == "http://10.0.0.1:8265"
    assert current_setting(runs, "ray").address == "http://127.0.0.1:9"  # `--backend ray` alone
    with pytest.raises(ClusterError, match="Unknown job backend 'slurmx'"):
        current_setting(runs, "slurmx")

    port = free_port()  # nothing listens there
    with pytest.raises(ClusterError, match=f"Ray cluster at http://127.0.0.1:{port} does not"):
        registry.submit("train", {}, device="cpu", backend="ray", address=f"127.0.0.1:{port}")
    assert registry.list() == []  # nothing was written
    assert [p.name for p in runs.iterdir() if p.is_dir()] == []

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "core",
            "train",
            "--submit",
            "--task",
            "mbpp",
            "--backend",
            "ray",
            "--ray-address",
            f"127.0.0.1:{port}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: The Ray cluster at"), out.stderr
    assert "Traceback" not in out.stderr


def test_train_and_eval_jobs_run_on_ray_and_show_in_the_registry(
    ray_head, runs, tiny_model_dir, data_file
):
    registry = JobRegistry(runs)
    train = registry.submit(
        "train",
        train_config(tiny_model_dir, data_file),
        device="cpu",
        label="on ray",
        backend="ray",
        address=ray_head.address,
    )
    evaluation = registry.submit(
        "eval",
        eval_job_config(str(tiny_model_dir), suite="tiny", limit=1, device="cpu"),
        device="cpu",
        backend="ray",
        address=ray_head.address,
    )
    for job in (train, evaluation):
        assert job.backend == RAY and job.engine_id.startswith(f"plens-{job.id}-a1-")
        assert job.where == f"ray {ray_head.address}"

    engine = RayEngine(ray_head.address)
    for job in (train, evaluation):
        done = registry.wait(job.id, timeout=400)
        assert done.status == SUCCEEDED, done.error
        engine_id = done.engine_id  # Ray sees the process exit a moment later
        wait_for(lambda e=engine_id: engine.state(e).final, 60, "Ray to see the end")
        assert engine.state(engine_id).status == "SUCCEEDED"
    assert (train.path / "adapter").is_dir() and (train.path / "summary.json").is_file()
    assert (evaluation.path / "eval.json").is_file()
    log = (train.path / "log.txt").read_text()
    assert "submitting job" in log and "done: step 2" in log  # the job's output, as locally
    meta = RayEngine(ray_head.address).client.get_job_info(train.engine_id).metadata
    assert meta["perplexity_lens_job"] == train.id

    # the CLI lists it with where it ran
    out = subprocess.run(
        [sys.executable, "-m", "core", "jobs", "list"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PLENS_RUNS_DIR=str(runs)),
    )
    assert out.returncode == 0 and f"ray {ray_head.address}" in out.stdout


def test_jobs_waiting_longer_than_rays_start_timeout_are_handed_over_again(
    ray_head, runs, tiny_model_dir, data_file
):
    """One job more than the head has CPU slots: the last waits for a slot longer than the
    head's start timeout (8 s here, 15 min by default), Ray drops it unstarted, and the registry
    hands it over again instead of failing it; all of them finish."""
    registry = JobRegistry(runs)
    jobs = [
        registry.submit(
            "train",
            train_config(tiny_model_dir, data_file, max_steps=40),
            device="cpu",
            backend="ray",
            address=ray_head.address,
        )
        for _ in range(CPUS + 1)
    ]
    done = [registry.wait(j.id, timeout=600) for j in jobs]
    assert [d.status for d in done] == [SUCCEEDED] * (CPUS + 1), [d.error for d in done]
    logs = [(d.path / "log.txt").read_text() for d in done]
    assert any("dropped it unstarted after its start timeout" in log for log in logs)


def test_cancel_goes_through_ray(ray_head, runs, tiny_model_dir, data_file):
    registry = JobRegistry(runs)
    job = registry.submit(
        "train",
        train_config(tiny_model_dir, data_file, max_steps=5000),
        device="cpu",
        backend="ray",
        address=ray_head.address,
    )
    wait_for(
        lambda: (
            "step" in (job.path / "metrics.jsonl").read_text()
            if (job.path / "metrics.jsonl").exists()
            else False
        ),
        240,
        "training to start",
    )
    done = registry.cancel(job.id, grace=5)
    assert done.status == CANCELLED, (done.status, done.error)
    engine = RayEngine(ray_head.address)
    assert wait_for(lambda: engine.state(job.engine_id).final, 60, "Ray to stop it")
    assert engine.state(job.engine_id).status in ("STOPPED", "FAILED")


def test_a_killed_job_shows_failed_with_the_engines_reason(
    ray_head, runs, tiny_model_dir, data_file
):
    registry = JobRegistry(runs)
    job = registry.submit(
        "train",
        train_config(tiny_model_dir, data_file, max_steps=5000),
        device="cpu",
        backend="ray",
        address=ray_head.address,
    )
    running = wait_for(
        lambda: (j := registry.get(job.id)).status == RUNNING and j.pid and j, 240, "a pid"
    )
    os.kill(running.pid, signal.SIGKILL)  # out-of-memory kill, say: no chance to report
    done = wait_for(lambda: (j := registry.get(job.id)).status != RUNNING and j, 120, "failed")
    assert done.status == FAILED
    assert done.error.startswith("the cluster reports the job FAILED"), done.error
    assert "last lines of log.txt" in done.error


def test_the_protocol_fans_its_arms_out_on_ray(ray_head, runs, tiny_model_dir):
    """GT and STM-25% on the tiny model as one protocol job on Ray: the arms run as Ray jobs
    side by side (their running times overlap; the head has a slot for each and for the
    generation), the Self-Output generation runs there too (the random model keeps no sample,
    so that arm is skipped with its reason), and the results and the report are written as for
    a local protocol."""
    from core.study.protocol import RESULTS_JSON, protocol_folder

    config = tiny_protocol_config(
        tiny_model_dir,
        methods=["gt", "stm_share", "self_output"],
        gen_samples=2,
        gen_max_new_tokens=8,
        gen_prompt_batch=4,
    )
    registry = JobRegistry(runs)
    folder = protocol_folder(config, name="proto-ray")
    job = registry.submit(
        "protocol",
        config.to_dict(),
        device="cpu",
        run_dir=folder,
        backend="ray",
        address=ray_head.address,
    )
    done = registry.wait(job.id, timeout=900)
    assert done.status == SUCCEEDED, done.error

    results = json.loads((folder / RESULTS_JSON).read_text())
    assert set(results["arms"]) == {"gt", "stm_share"}
    assert any(n.startswith("Self-Output skipped") for n in results["notes"])
    children = [j for j in registry.list() if j.id != job.id]
    assert {j.kind for j in children} == {"train", "generate"}
    assert all(j.backend == RAY for j in children)
    (generation,) = [j for j in children if j.kind == "generate"]
    assert generation.status == FAILED and "No prompt had a correct sample" in generation.error
    assert any(generation.id in n and "skipped" in n for n in results["notes"])
    arms = sorted((j for j in children if j.kind == "train"), key=lambda j: j.started)
    assert len(arms) == 2 and all(j.status == SUCCEEDED for j in arms), [j.error for j in arms]
    assert arms[1].started < arms[0].finished  # side by side, not one after the other
    assert (folder / "report.html").is_file()


def test_the_start_page_checks_a_ray_address_before_saving_it(ray_head, runs, monkeypatch):
    """Where jobs run, on the Start page: an address that does not answer is refused with the
    reason and the saved choice stays; a live head is saved and the Train page says so."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.chdir(ROOT)

    def start_page() -> AppTest:
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=60)
        at.run()
        assert not at.exception, [e.value for e in at.exception]
        return at

    at = start_page()
    at.radio(key="backend-name").set_value("ray").run()
    at.text_input(key="backend-address").set_value(f"127.0.0.1:{free_port()}").run()
    at.button(key="backend-save").click().run()
    assert any("does not answer" in e.value for e in at.error), [e.value for e in at.error]
    assert current_setting(runs).name == "local"  # nothing saved

    at.text_input(key="backend-address").set_value(ray_head.address).run()
    at.button(key="backend-save").click().run()
    assert any(f"Ray at {ray_head.address}" in s.value for s in at.success)
    assert current_setting(runs) == make_setting("ray", ray_head.address)

    at = start_page()  # a fresh session reads the saved choice back
    assert at.radio(key="backend-name").value == "ray"
    assert at.text_input(key="backend-address").value == ray_head.address


def test_cancelling_a_protocol_on_ray_cancels_its_arms(ray_head, runs, tiny_model_dir):
    """No orphans: a protocol cancelled while its arms train on Ray takes them down with it."""
    from core.study.protocol import protocol_folder

    config = tiny_protocol_config(tiny_model_dir, epochs=500.0, learning_rate=1e-3)
    registry = JobRegistry(runs)
    folder = protocol_folder(config, name="proto-cancel")
    job = registry.submit(
        "protocol",
        config.to_dict(),
        device="cpu",
        run_dir=folder,
        backend="ray",
        address=ray_head.address,
    )
    arms = wait_for(
        lambda: (
            len(a := [j for j in registry.list() if j.kind == "train"]) == 2
            and all(j.status == RUNNING for j in a)
            and a
        ),
        240,
        "both arms running",
    )
    assert registry.cancel(job.id, grace=5).status == CANCELLED
    for arm in arms:
        done = wait_for(lambda a=arm: (j := registry.get(a.id)).status != RUNNING and j, 60, "arm")
        assert done.status == CANCELLED, (done.status, done.error)


def test_a_job_the_restarted_head_no_longer_knows_is_failed_as_lost(
    ray_head, runs, tiny_model_dir, data_file
):
    """Last in this module: it restarts the head. While the head is down, the job keeps its
    status with a note; once a new head answers and does not know the job, it is failed."""
    registry = JobRegistry(runs)
    job = registry.submit(
        "train",
        train_config(tiny_model_dir, data_file, max_steps=5000),
        device="cpu",
        backend="ray",
        address=ray_head.address,
    )
    running = wait_for(
        lambda: (j := registry.get(job.id)).status == RUNNING and j.pid and j, 240, "a pid"
    )
    ray_head.stop()
    with __import__("contextlib").suppress(ProcessLookupError):
        os.kill(running.pid, signal.SIGKILL)  # the node went down with the head
    down = registry.get(job.id)
    assert down.status == RUNNING and "does not answer" in down.message
    ray_head.start()
    lost = wait_for(lambda: (j := registry.get(job.id)).status != RUNNING and j, 60, "lost")
    assert lost.status == FAILED and lost.error.startswith("lost by the cluster"), lost.error
