"""Processes a test run leaves behind.

Every process this test session starts carries `SESSION_ENV=<a fresh id>` in its environment
(conftest.py sets it before any test, and children inherit it: job processes, daemons and their
workers), so the session can find its own processes among everything else on the machine, even
those re-parented to init, without touching anyone else's. A daemon that rebuilds its children's
environment (slurmd's job steps keep only SLURM_CONF) is found by the id in its folder's name:
fixtures that start one put `session_id()` in the folder's name (`SlurmCluster`, `RayHead`).
"""

from __future__ import annotations

import os
import signal
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

SESSION_ENV = "PLENS_TEST_SESSION"


def new_session_id() -> str:
    """A fresh id for this session's processes, set in the environment its children inherit."""
    value = uuid.uuid4().hex[:12]
    os.environ[SESSION_ENV] = value
    return value


def session_id() -> str:
    """This session's id (for the names of folders a daemon's processes mention)."""
    return os.environ.get(SESSION_ENV, "")


def _ancestors() -> set[int]:
    """This process and its parents (they carry the marker too, and are not left over)."""
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            break
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return pids


def command_line(pid: int) -> str:
    """A process's command line as one string ('' once it is gone)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def processes_mentioning(text: str) -> dict[int, str]:
    """pid -> command line of every live process (not this one or its parents) whose
    environment or command line contains `text`. Zombies have neither and are not listed."""
    if not text:
        return {}
    needle = text.encode()
    skip = _ancestors()
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in skip:
            continue
        try:
            seen = (entry / "environ").read_bytes() + b"\0" + (entry / "cmdline").read_bytes()
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if needle in seen and _alive(int(entry.name)):
            found[int(entry.name)] = command_line(int(entry.name))
    return found


def session_processes(session: str) -> dict[int, str]:
    """The live processes this test session started (see the module docstring)."""
    return processes_mentioning(session)


def wait_gone(pids: Iterable[int], timeout: float) -> set[int]:
    """Wait up to `timeout` seconds for the processes to exit; the pids still alive."""
    alive = set(pids)
    deadline = time.monotonic() + timeout
    while alive:
        alive = {p for p in alive if _alive(p)}
        if not alive or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    return alive


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def stop_processes(pids: Iterable[int], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL what is still there after `grace` seconds (at once when 0)."""
    pids = set(pids)
    if grace > 0:
        for pid in pids:
            _signal(pid, signal.SIGTERM)
    for pid in wait_gone(pids, grace) if grace > 0 else pids:
        _signal(pid, signal.SIGKILL)
    wait_gone(pids, 5.0)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
