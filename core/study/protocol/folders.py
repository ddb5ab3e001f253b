"""A protocol's folders and what they hold while it runs: where the protocol and each of its
runs live, its progress lines, which runs finished and how long they took, the Self-Output set
a generation run wrote, the partial results as each run finishes, and the time left."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.errors import LensError
from core.io import read_json, write_json_atomic
from core.jobs.metrics import DoneRecord, of_kind
from core.jobs.runfiles import CONFIG_JSON, SUMMARY_JSON, StatusFn, read_records, runs_dir
from core.jobs.state import StateReporter
from core.study.protocol.config import PARTIAL_JSON, PROGRESS_TXT, PROTOCOL_KIND, ProtocolConfig
from core.study.protocol.results import aggregate


def protocol_folder(
    config: ProtocolConfig, *, name: str | None = None, run_dir: str | Path | None = None
) -> Path:
    """Where a protocol lives: `run_dir`, else `<runs_dir()>/<name>` (default
    ``protocol-<preset>``), so running the same command again resumes it. A folder that holds
    a protocol with other settings is refused (one line) before anything runs."""
    if run_dir and name:
        raise LensError("Give --name or --run-dir, not both.")
    if name is not None and (not name.strip() or "/" in name or name.startswith(".")):
        raise LensError(f"--name must be a plain folder name, got {name!r}.")
    folder = (
        Path(run_dir).expanduser().absolute()
        if run_dir
        else runs_dir() / (name or f"protocol-{config.preset}")
    )
    saved = read_json(folder / CONFIG_JSON)
    if isinstance(saved, dict):
        if saved.get("kind") != PROTOCOL_KIND:
            raise LensError(f"{folder} holds another kind of run; pick another --name.")
        if ProtocolConfig.from_dict(saved).to_dict() != config.to_dict():
            raise LensError(
                f"{folder} holds a protocol with other settings; pick another --name "
                "(or the same settings to resume it)."
            )
    return folder


def run_id(protocol_dir: Path, arm: str, seed: int) -> str:
    """Run folder name of one arm and seed."""
    return f"{protocol_dir.name}-{arm}-s{seed}"


def say(folder: Path, message: str, status: StatusFn | None = None) -> None:
    """A progress line: printed, appended to the folder's progress file (what the app shows,
    in the foreground too) and set as the job's status message."""
    line = f"[{time.strftime('%H:%M:%S')}] {message}"
    print(line, flush=True)
    with open(folder / PROGRESS_TXT, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
    if status and not isinstance(status, StateReporter):  # a reporter gets typed states instead
        status(message)


def run_seconds(run_dir: Path) -> float | None:
    """How long a finished run took (its summary's wall time)."""
    summary = read_json(run_dir / SUMMARY_JSON)
    wall = summary.get("wall_time_s") if isinstance(summary, dict) else None
    return float(wall) if wall is not None else None


def run_finished(run_dir: Path) -> bool:
    """Whether a run's training finished (its summary is written)."""
    return isinstance(read_json(run_dir / SUMMARY_JSON), dict)


def generated_set(gen_dir: Path) -> str | None:
    """The set folder a finished generation run wrote (its "done" record)."""
    done = [r for r in of_kind(read_records(gen_dir), DoneRecord) if r.fields.get("set")]
    return str(done[-1].fields["set"]) if done else None


def existing_set(gen_dir: Path) -> str | None:
    """The set a finished generation run wrote, if it is still there (a protocol reuses it)."""
    found = generated_set(gen_dir)
    return found if found and Path(found).is_dir() else None


def protocol_eta(
    durations: Sequence[float], planned: int, finished: int, current_elapsed: float | None
) -> float | None:
    """Seconds left in a protocol: the runs not finished at the mean measured duration of the
    finished ones, less what the running one has already spent (None before any finished)."""
    if not durations:
        return None
    mean = sum(durations) / len(durations)
    left = max(0, planned - finished)
    if current_elapsed is None or left == 0:
        return mean * left
    return mean * (left - 1) + max(0.0, mean - current_elapsed)


def write_partial_results(
    config: ProtocolConfig, folder: Path, runs: Sequence[dict[str, Any]], planned: int
) -> dict[str, Any] | None:
    """Results over the runs finished so far (means and 95% intervals over the seeds done, no
    paired comparisons), written to `PARTIAL_JSON` with how many of how many runs they cover;
    None (and nothing written) before any run finished."""
    done = [r for r in runs if r.get("status") == "succeeded"]
    if not done:
        return None
    ended = [r for r in runs if "status" in r]  # on a cluster some are still running
    partial = aggregate(config, ended, [], 0.0, paired=False)
    partial["partial"] = {
        "finished": len(done),
        "planned": planned,
        "runs": [r["run"] for r in done],
    }
    write_json_atomic(folder / PARTIAL_JSON, partial)
    return partial
