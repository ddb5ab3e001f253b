"""What a job is doing now: one typed state, written by the job, read by every view.

A job moves through distinct phases: preparing data (loading the model, scoring the data with
the original model), evaluating step k (task i of n, items done of total), training (step k of
N), the final evaluation, saving; a data-generation job generates; a protocol job runs its arms
one after another. `RunState` is one such moment, with the measured rate and the time left it
implies; `RunState.line()` is the one sentence the job log, the registry's status line, the pages
and `python -m core jobs list` show.

`StateReporter` is what a job process reports through: it measures the rates (seconds a training
step, excluding evaluation rounds; items a second within an evaluation task; examples a second
while scoring), writes the state to `<run folder>/run_state.json` (atomically, every report), sets
the registry's status line and echoes the line to the job log on every change of phase and at
most every `LOG_EVERY_S` seconds otherwise. It is also a `StatusFn` (a plain callable taking a
line): a free-form note is a "preparing data" state, so code that only knows how to say a line
still reports something true.

`live_state` reads the state back for a view, only while the job runs (a job that died
mid-round leaves its file behind).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from core.fmt import duration, num
from core.io import read_json, write_json_atomic

RUN_STATE_JSON = "run_state.json"
#: Without a job row to say the run is alive, a state file older than this is a left-over of a
#: process that died, not a job in progress.
STALE_S = 600.0


class Phase(enum.StrEnum):
    """The distinct things a job can be doing."""

    PREPARING = "preparing"
    TRAINING = "training"
    EVALUATING = "evaluating"
    FINAL_EVAL = "final_evaluation"
    SAVING = "saving"
    GENERATING = "generating"
    PROTOCOL = "protocol"

    @property
    def label(self) -> str:
        """How the views name the phase ("preparing data", "final evaluation", ...)."""
        return PHASE_LABELS[self]


PHASE_LABELS = {
    Phase.PREPARING: "preparing data",
    Phase.TRAINING: "training",
    Phase.EVALUATING: "evaluating",
    Phase.FINAL_EVAL: "final evaluation",
    Phase.SAVING: "saving",
    Phase.GENERATING: "generating",
    Phase.PROTOCOL: "protocol",
}


@dataclass(frozen=True)
class RunState:
    """One moment of a job: its phase, where it is in it and, from measured rates, the time
    left. Times are wall-clock at `time`; `remaining()` counts down from there."""

    phase: Phase
    #: training step (the step being evaluated, for an evaluation round)
    step: int | None = None
    max_steps: int | None = None
    #: evaluation: the task, its 0-based index among `tasks`
    task: str = ""
    task_index: int | None = None
    tasks: int | None = None
    #: units done of total in this phase (evaluation items, scored examples, prompts, runs)
    done: int | None = None
    total: int | None = None
    unit: str = ""
    #: a free-form part of the line (what is being prepared, which protocol arm runs)
    detail: str = ""
    #: seconds spent in this phase (an evaluation: in this round) at `time`
    elapsed_s: float | None = None
    #: measured seconds a unit (a training step; an item; an example)
    seconds_per_unit: float | None = None
    #: seconds left at `time` (None: not measured yet), and what they cover ("in this task")
    eta_s: float | None = None
    eta_scope: str = ""
    time: float = field(default_factory=time.time)

    # -- reading ------------------------------------------------------------------------------

    @property
    def label(self) -> str:
        """The phase as the views name it."""
        return self.phase.label

    @property
    def fraction(self) -> float:
        """How far the phase is, 0-1: evaluation items done of the task's items where the task
        counts them, else tasks done of the round's; training steps; units done of total."""
        if self.phase in (Phase.EVALUATING, Phase.FINAL_EVAL):
            if self.total:
                return _clip((self.done or 0) / self.total)
            return _clip((self.task_index or 0) / self.tasks) if self.tasks else 0.0
        if self.phase == Phase.TRAINING:
            return _clip((self.step or 0) / self.max_steps) if self.max_steps else 0.0
        return _clip((self.done or 0) / self.total) if self.total else 0.0

    def remaining(self, now: float | None = None) -> float | None:
        """Seconds left now (the measured `eta_s`, counted down since it was written)."""
        if self.eta_s is None:
            return None
        now = time.time() if now is None else now
        return max(0.0, self.eta_s - max(0.0, now - self.time))

    def line(self, now: float | None = None) -> str:
        """The one line the log, the status message, the pages and `jobs list` show, e.g.
        "evaluating step 8 of 16: ood_drift (task 3 of 5) · 40/200 items · 1m12s, about 2m50s
        left in this task" or "training: step 5/16 · 1m40s, about 3m40s left (20s a step)"."""
        phase = self.phase
        if phase in (Phase.EVALUATING, Phase.FINAL_EVAL):
            if phase == Phase.FINAL_EVAL:
                head = "final evaluation" + ("" if self.step is None else f" (step {self.step})")
            else:
                head = "evaluating"
                if self.step is not None:
                    head += f" step {self.step}"
                    if self.max_steps:
                        head += f" of {self.max_steps}"
            text = head
            if self.task:
                text += f": {self.task}"
                if self.tasks:
                    text += f" (task {(self.task_index or 0) + 1} of {self.tasks})"
        elif phase == Phase.TRAINING:
            text = "training"
            if self.step is not None and self.max_steps:
                text += f": step {self.step}/{self.max_steps}"
        elif phase == Phase.PROTOCOL:
            text = f"{self.done or 0} of {self.total or 0} runs finished"
            if self.detail:
                text += f" · running {self.detail}"
        else:
            text = self.label + (f": {self.detail}" if self.detail else "")
        if self.total and phase != Phase.PROTOCOL:
            text += f" · {self.done or 0}/{self.total}" + (f" {self.unit}" if self.unit else "")
        return text + self._timing(now)

    def _timing(self, now: float | None) -> str:
        parts = []
        if self.elapsed_s is not None and self.elapsed_s >= 0.5:  # not "0s" on a first report
            parts.append(duration(self.elapsed_s))
        left = self.remaining(now)
        if left is not None:
            scope = f" {self.eta_scope}" if self.eta_scope else ""
            parts.append(f"about {duration(left)} left{scope}")
        text = (" · " + ", ".join(parts)) if parts else ""
        if self.phase == Phase.TRAINING and self.seconds_per_unit:
            text += f" ({duration_or_fraction(self.seconds_per_unit)} a step)"
        return text

    # -- storage ------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """JSON form (the phase by value, the line as the writer saw it)."""
        out = asdict(self)
        out["phase"] = self.phase.value
        out["line"] = self.line(self.time)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunState | None:
        """The state `to_dict` wrote; None for anything else (an unknown phase, wrong types)."""
        try:
            phase = Phase(str(data.get("phase")))
            names = set(cls.__dataclass_fields__) - {"phase"}
            values = {k: v for k, v in data.items() if k in names}
            return cls(phase=phase, **values)
        except (TypeError, ValueError):
            return None


def duration_or_fraction(seconds: float) -> str:
    """A short per-unit time: "0.4s" under ten seconds, else `core.fmt.duration`."""
    return f"{num(seconds, 2)}s" if seconds < 10 else duration(seconds)


def _clip(value: float) -> float:
    return min(1.0, max(0.0, value))


# --------------------------------------------------------------------------- the run file


def write_state(run_dir: str | Path, state: RunState | None) -> None:
    """Record the job's state in its run folder (None: the file goes)."""
    path = Path(run_dir) / RUN_STATE_JSON
    if state is None:
        path.unlink(missing_ok=True)
    else:
        write_json_atomic(path, state.to_dict())


def read_state(run_dir: str | Path) -> RunState | None:
    """The state last written in `run_dir` (None: none, or unreadable)."""
    data = read_json(Path(run_dir) / RUN_STATE_JSON)
    return RunState.from_dict(data) if isinstance(data, dict) else None


def live_state(
    run_dir: str | Path, job_status: str | None, *, now: float | None = None
) -> RunState | None:
    """The state of the job running in `run_dir`: only while its job runs (`job_status`
    "running"); a run without a job row (None) counts only a state written in the last
    `STALE_S` seconds."""
    if job_status is not None and job_status != "running":
        return None
    state = read_state(run_dir)
    if state is None:
        return None
    now = time.time() if now is None else now
    if job_status is None and now - state.time > STALE_S:
        return None
    return state


# --------------------------------------------------------------------------- the job's side


MessageFn = Callable[[str], None]


class StateReporter:
    """The job's side: measure rates, write `run_state.json`, set the status line, log.

    Call it with a line (a `StatusFn`) for a free-form "preparing data" note, or use the typed
    methods. `run_dir` None keeps the state in memory only (and still sets the message)."""

    LOG_EVERY_S = 10.0

    def __init__(
        self,
        run_dir: str | Path | None,
        message: MessageFn | None = None,
        *,
        echo: bool = True,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.run_dir = None if run_dir is None else Path(run_dir)
        self.message, self.echo, self.clock = message, echo, clock
        self.state: RunState | None = None
        self._phase_started = clock()
        self._logged = -1e18
        # training rate: seconds and steps spent training (evaluation rounds excluded)
        self._train_mark: tuple[float, int] | None = None
        self._train_seconds, self._train_steps = 0.0, 0
        # a counted unit's rate (scoring examples, evaluation items): (key, start time, start done)
        self._count: tuple[Any, float, int] | None = None
        self._round: tuple[int | None, float] | None = None

    # -- StatusFn ---------------------------------------------------------------------------

    def __call__(self, text: str) -> None:
        """A free-form note: "preparing data: <text>"."""
        self.preparing(text)

    # -- typed reports ----------------------------------------------------------------------

    def preparing(
        self, detail: str, done: int | None = None, total: int | None = None, unit: str = ""
    ) -> None:
        """Loading the model or data, scoring it with the original model (`done` of `total`
        `unit`s, with an ETA from the measured rate)."""
        elapsed, rate, eta = self._counted(("prep", detail, total), done, total)
        self.report(
            RunState(
                Phase.PREPARING,
                detail=detail,
                done=done,
                total=total,
                unit=unit,
                elapsed_s=elapsed,
                seconds_per_unit=rate,
                eta_s=eta,
            )
        )

    def training(self, step: int, max_steps: int | None) -> None:
        """At training step `step` of `max_steps`; the ETA is the remaining steps times the
        measured seconds a step, counting only time spent training."""
        now = self.clock()
        was_training = self.state is not None and self.state.phase == Phase.TRAINING
        if was_training and self._train_mark is not None:
            since, at = self._train_mark
            if step > at:
                self._train_seconds += now - since
                self._train_steps += step - at
        self._train_mark = (now, int(step))
        rate = self._train_seconds / self._train_steps if self._train_steps else None
        eta = None
        if rate is not None and max_steps:
            eta = max(0, int(max_steps) - int(step)) * rate
        self.report(
            RunState(
                Phase.TRAINING,
                step=int(step),
                max_steps=max_steps,
                elapsed_s=self._train_seconds or None,
                seconds_per_unit=rate,
                eta_s=eta,
            )
        )

    def evaluating(
        self,
        step: int | None,
        task: str,
        index: int,
        tasks: int,
        done: int,
        items: int,
        *,
        max_steps: int | None = None,
        final: bool = False,
    ) -> None:
        """An evaluation round at `step` (`final`: the one after the last step): task `index`
        (0-based) of `tasks`, `done` of `items` items; the ETA is this task's remaining items
        at its measured items a second."""
        now = self.clock()
        if self._round is None or self._round[0] != step:
            self._round = (step, now)
        _, rate, eta = self._counted(("eval", step, task), done, items or None)
        self.report(
            RunState(
                Phase.FINAL_EVAL if final else Phase.EVALUATING,
                step=step,
                max_steps=max_steps,
                task=task,
                task_index=index,
                tasks=tasks,
                done=done if items else None,
                total=items or None,
                unit="items",
                elapsed_s=now - self._round[1],
                seconds_per_unit=rate,
                eta_s=eta,
                eta_scope="in this task" if eta is not None else "",
            )
        )

    def round_ended(self) -> None:
        """An evaluation round ended (the next report starts a new one)."""
        self._round = None
        self._train_mark = None  # the time since the last step was evaluation, not training

    def saving(self, detail: str = "the model") -> None:
        """Writing the final model."""
        self.report(RunState(Phase.SAVING, detail=detail))

    def generating(self, done: int, total: int, unit: str = "prompts", detail: str = "") -> None:
        """Data generation: `done` of `total` `unit`s, with an ETA from the measured rate."""
        elapsed, rate, eta = self._counted(("gen", total), done, total)
        self.report(
            RunState(
                Phase.GENERATING,
                done=done,
                total=total,
                unit=unit,
                detail=detail,
                elapsed_s=elapsed,
                seconds_per_unit=rate,
                eta_s=eta,
            )
        )

    # -- the one writer -----------------------------------------------------------------------

    def report(self, state: RunState) -> None:
        """Record `state`: the run file, the status line, and the log on a change of phase (or
        every `LOG_EVERY_S` seconds)."""
        previous, self.state = self.state, state
        now = self.clock()
        if previous is None or previous.phase != state.phase:
            self._phase_started = now
        line = state.line(state.time)
        if self.run_dir is not None:
            write_state(self.run_dir, state)
        if self.message is not None:
            self.message(line)
        changed = (
            previous is None
            or previous.phase != state.phase
            or previous.task != state.task
            or (previous.step != state.step and state.phase != Phase.TRAINING)
            or (state.total is not None and state.done == state.total)
        )
        if self.echo and (changed or now - self._logged >= self.LOG_EVERY_S):
            self._logged = now
            print(line, flush=True)

    def _counted(
        self, key: Any, done: int | None, total: int | None
    ) -> tuple[float | None, float | None, float | None]:
        """(elapsed, seconds a unit, seconds left) of a counted phase under `key`, measured from
        its first report (units already done then, e.g. from a cache, do not count)."""
        now = self.clock()
        if self._count is None or self._count[0] != key:
            self._count = (key, now, int(done or 0))
        _, since, first = self._count
        elapsed = now - since
        if done is None or not total:
            return elapsed, None, None
        counted = int(done) - first
        if counted <= 0 or elapsed <= 0:
            return elapsed, None, None
        rate = elapsed / counted
        return elapsed, rate, max(0, int(total) - int(done)) * rate


def as_reporter(
    status: Callable[[str], None] | None, run_dir: str | Path | None = None, *, echo: bool = False
) -> StateReporter | None:
    """`status` as a `StateReporter`: itself when it is one, else one that passes each line to
    the plain callable (and writes `run_dir`'s state file when given); None stays None unless
    `run_dir` is given."""
    if isinstance(status, StateReporter):
        return status
    if status is None and run_dir is None:
        return None
    return StateReporter(run_dir, status, echo=echo)
