"""In-process background work for short interactive jobs (scoring, generation).

The app's server process outlives browser sessions, so work started here survives a page reload:
the page finds its task again by key and shows its progress or result. Long jobs (training,
evaluation, data generation) run as separate OS processes through the job system instead.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core.errors import LensError

RUNNING, DONE, FAILED = "running", "done", "failed"


@dataclass
class BackgroundTask:
    """State of one background task, updated by its worker thread."""

    key: str
    label: str
    status: str = RUNNING
    done: int = 0
    total: int = 0
    message: str = ""
    error: str = ""
    detail: str = ""
    result: Any = None
    partial: Any = None  # an early, incomplete result a page may show while the task runs
    started: float = field(default_factory=time.time)
    finished: float | None = None
    #: set by `BackgroundRunner.stop` (a Stop button); work that can stop early checks it
    stop_requested: threading.Event = field(default_factory=threading.Event)

    @property
    def stopping(self) -> bool:
        """Whether someone asked the task to stop."""
        return self.stop_requested.is_set()

    def progress(self, done: int, total: int) -> None:
        """Progress callback for the worker."""
        self.done, self.total = done, total

    @property
    def fraction(self) -> float:
        """Share done, 0..1."""
        return self.done / self.total if self.total else 0.0

    @property
    def elapsed(self) -> float:
        """Seconds since start (or until finish)."""
        return (self.finished or time.time()) - self.started


class BackgroundRunner:
    """Runs callables in daemon threads, one per key; a key already running is not restarted."""

    def __init__(self, max_tasks: int = 50) -> None:
        self._lock = threading.Lock()
        self._tasks: dict[str, BackgroundTask] = {}
        self._max_tasks = max_tasks

    def get(self, key: str) -> BackgroundTask | None:
        """The task for `key`, if any."""
        return self._tasks.get(key)

    def start(
        self, key: str, label: str, work: Callable[[BackgroundTask], Any], restart: bool = False
    ) -> BackgroundTask:
        """Start `work(task)` in a thread unless a task with this key is running or done."""
        with self._lock:
            task = self._tasks.get(key)
            if task is not None and (task.status == RUNNING or not restart):
                return task
            task = BackgroundTask(key=key, label=label)
            self._tasks[key] = task
            self._evict_locked()
        threading.Thread(target=self._run, args=(task, work), daemon=True, name=label).start()
        return task

    def _run(self, task: BackgroundTask, work: Callable[[BackgroundTask], Any]) -> None:
        try:
            task.result = work(task)
            task.status = DONE
        except LensError as exc:
            task.error = str(exc)
            task.status = FAILED
        except Exception as exc:  # noqa: BLE001 - shown to the user with its traceback
            task.error = f"unexpected {type(exc).__name__}: {exc}"
            task.detail = traceback.format_exc()
            task.status = FAILED
        finally:
            task.finished = time.time()

    def stop(self, key: str) -> bool:
        """Ask the running task `key` to stop (its work decides when it can); whether one was
        running."""
        task = self._tasks.get(key)
        if task is None or task.status != RUNNING:
            return False
        task.stop_requested.set()
        return True

    def forget(self, key: str) -> None:
        """Drop a finished task (so it can be started again)."""
        with self._lock:
            task = self._tasks.get(key)
            if task is not None and task.status != RUNNING:
                del self._tasks[key]

    def _evict_locked(self) -> None:
        finished = [t for t in self._tasks.values() if t.status != RUNNING]
        finished.sort(key=lambda t: t.finished or 0)
        while len(self._tasks) > self._max_tasks and finished:
            self._tasks.pop(finished.pop(0).key, None)
