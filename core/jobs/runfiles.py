"""Run folders: where they live, and the files a job writes into one (config, log, metrics, summary)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.io import append_jsonl, append_jsonl_lines, cache_dir, read_jsonl
from core.jobs.metrics import (
    DoneRecord,
    EvalSummaryRecord,
    MetricRecord,
    StartRecord,
    TrainRecord,
    as_records,
    parse_records,
)

CONFIG_JSON = "config.json"
LOG_TXT = "log.txt"
METRICS_JSONL = "metrics.jsonl"
SUMMARY_JSON = "summary.json"
LOG_TAIL_LINES = 30


#: A job's status-line callback (the registry's progress note).
StatusFn = Callable[[str], None]

EVAL_DIR = "eval"  # per-item results of each evaluation round: eval/step-<N>.json
CHECKPOINTS_DIR = "checkpoints"  # a training run's `checkpoint-N/` folders (N = global step)
ADAPTER_DIR = "adapter"  # a finished training run's final adapter (or full model)
_CHECKPOINT_PREFIX = "checkpoint-"


def eval_round_path(run_dir: str | Path, step: int) -> Path:
    """Where one evaluation round's full result (per-item details included) is kept."""
    return Path(run_dir) / EVAL_DIR / f"step-{int(step)}.json"


def eval_round_steps(run_dir: str | Path) -> list[int]:
    """The steps with a saved evaluation round, ascending."""
    folder = Path(run_dir) / EVAL_DIR
    steps = []
    for path in folder.glob("step-*.json") if folder.is_dir() else ():
        digits = path.stem.removeprefix("step-")
        if digits.isdigit():
            steps.append(int(digits))
    return sorted(steps)


def checkpoint_step(folder: str | Path) -> int | None:
    """N for a `checkpoint-N` folder; None for any other name."""
    name = Path(folder).name
    digits = name[len(_CHECKPOINT_PREFIX) :]
    return int(digits) if name.startswith(_CHECKPOINT_PREFIX) and digits.isdigit() else None


def checkpoints(run_dir: str | Path, *, complete: bool = False) -> list[Path]:
    """A run folder's `checkpoints/checkpoint-N/` folders (or the `checkpoint-N/` folders directly
    in `run_dir`, when it has no checkpoints folder), oldest step first; `complete` keeps only those written to the
    end (with trainer_state.json: a run killed while saving leaves a partial folder)."""
    root = Path(run_dir)
    if (root / CHECKPOINTS_DIR).is_dir():
        root = root / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [
        (step, p)
        for p in root.iterdir()
        if p.is_dir()
        and (step := checkpoint_step(p)) is not None
        and (not complete or (p / "trainer_state.json").is_file())
    ]
    return [p for _, p in sorted(found)]


def runs_dir(*, create: bool = True) -> Path:
    """Root of all run folders and the registry: $PLENS_RUNS_DIR or <cache_dir()>/runs (made
    unless `create` is False)."""
    override = os.environ.get("PLENS_RUNS_DIR")
    path = Path(override).expanduser() if override else cache_dir() / "runs"
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def append_metric(run_dir: str | Path, record: dict[str, Any] | MetricRecord) -> None:
    """Append one record as one line to `<run_dir>/metrics.jsonl` (one write, then fsync).

    Records carry a "kind": "train" (step, epoch, time, loss, lr, ...), "eval" (step, task,
    metric, value, n, role), "done" (step, ...), plus "start" / "checkpoint" written by training.
    If an earlier writer died mid-line, the new record starts on a fresh line so only the broken
    line is lost.
    """
    row = record.to_dict() if isinstance(record, MetricRecord) else record
    append_jsonl(Path(run_dir) / METRICS_JSONL, row)


def append_metrics(run_dir: str | Path, records: Sequence[dict[str, Any] | MetricRecord]) -> None:
    """Append several records in one write (`core.io.append_jsonl_lines`): an evaluation
    round's records reach metrics.jsonl all together or not at all."""
    rows = [r.to_dict() if isinstance(r, MetricRecord) else r for r in records]
    append_jsonl_lines(Path(run_dir) / METRICS_JSONL, rows)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All complete records of `<run_dir>/metrics.jsonl`, in file order.

    A line that is not valid JSON (a record being written right now, or one cut off by a crash)
    is skipped; a missing file gives an empty list.
    """
    return [r for r in read_jsonl(Path(run_dir) / METRICS_JSONL) if isinstance(r, dict)]


def log_tail(run_dir: str | Path, lines: int = LOG_TAIL_LINES, max_bytes: int = 65536) -> str:
    """The last `lines` lines of the run's log (progress-bar carriage returns resolved)."""
    path = Path(run_dir) / LOG_TXT
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - max_bytes))
            data = fh.read()
    except OSError:
        return ""
    text = data.decode("utf-8", errors="replace")
    out = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
    return "\n".join(out[-lines:])


@dataclass
class RunProgress:
    """Where a training run is, read from its metrics: step of max_steps, ETA, last loss."""

    step: int = 0
    max_steps: int | None = None
    last_loss: float | None = None
    eta_seconds: float | None = None
    done: bool = False

    @property
    def fraction(self) -> float:
        """Share of steps done, 0..1 (0 when the total is not known yet)."""
        if self.done:
            return 1.0
        if not self.max_steps:
            return 0.0
        return min(1.0, self.step / self.max_steps)


def read_records(run_dir: str | Path) -> list[MetricRecord]:
    """The typed records of `<run_dir>/metrics.jsonl` (see `core.jobs.metrics`)."""
    return parse_records(read_metrics(run_dir))


def run_progress(records: Sequence[Any]) -> RunProgress:
    """Progress of a run from its metrics records (typed or as read): the latest "start"
    record sets the pace; the ETA is the remaining steps at the measured seconds a step, the
    evaluation rounds' time (their `seconds`) left out."""
    progress = RunProgress()
    start: StartRecord | None = None
    last_train: TrainRecord | None = None
    evaluating = evaluated = 0.0  # seconds of evaluation rounds since the start (up to the
    # last training record): not training time
    for rec in as_records(records):
        if isinstance(rec, StartRecord):
            start, last_train, evaluating = rec, None, 0.0
            progress.max_steps = rec.max_steps
            progress.step = int(rec.step or 0)
        elif isinstance(rec, EvalSummaryRecord) and start is not None and rec.seconds:
            evaluating += min(float(rec.seconds), max(0.0, rec.time - start.time))
        elif isinstance(rec, TrainRecord):
            last_train, evaluated = rec, evaluating
            progress.step = int(rec.step or progress.step)
            if rec.loss is not None:
                progress.last_loss = float(rec.loss)
        elif isinstance(rec, DoneRecord):
            progress.done = True
            progress.step = int(rec.step or progress.step)
    if start and last_train and progress.max_steps and not progress.done:
        steps = progress.step - int(start.step or 0)
        elapsed = last_train.time - start.time - evaluated
        if steps > 0 and elapsed > 0:
            progress.eta_seconds = (progress.max_steps - progress.step) * elapsed / steps
    return progress
