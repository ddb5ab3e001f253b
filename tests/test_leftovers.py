"""The suite's check that no test leaves a process running (tests/conftest.py,
`_no_process_left_behind`): a module whose test starts a daemon and leaves it fails, names the
process, and the process is stopped; a module that stops what it starts passes."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

from tests import leftovers

ROOT = Path(__file__).resolve().parents[1]

CLEAN = """
import subprocess, sys

def test_starts_and_stops_a_server():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    proc.terminate()
    proc.wait()
"""

LEAKY = """
import subprocess, sys

def test_starts_a_daemon_and_forgets_it():
    # its own session and nobody waits for it, as a daemon's job step
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)  # {token}"],
                     start_new_session=True)
"""


def test_a_module_that_leaves_a_process_running_fails_and_the_process_is_stopped(tmp_path):
    token = uuid.uuid4().hex
    (tmp_path / "test_clean.py").write_text(CLEAN)
    (tmp_path / "test_leaky.py").write_text(LEAKY.format(token=token))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "tests.conftest",
            "-c",
            str(ROOT / "pyproject.toml"),
            "--rootdir",
            str(ROOT),
            str(tmp_path / "test_clean.py"),
            str(tmp_path / "test_leaky.py"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert "2 passed, 1 error" in out, out
    assert "ERROR at teardown of test_starts_a_daemon_and_forgets_it" in out, out
    assert "test_leaky left 1 process(es) running" in out and token in out, out
    assert "test_clean left" not in out, out
    assert leftovers.processes_mentioning(token) == {}  # the check stopped it
