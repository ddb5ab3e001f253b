"""Reading protocol folders for the app: `ProtocolView` (settings, progress, partial and final
results, the time left, the log of the step running now), `load_protocol`, `list_protocols`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import LensError
from core.io import read_json
from core.jobs.runfiles import CONFIG_JSON, runs_dir
from core.jobs.state import Phase, RunState
from core.study.protocol.config import (
    GENERATION_DIR,
    PARTIAL_JSON,
    PROGRESS_TXT,
    PROTOCOL_KIND,
    RESULTS_JSON,
    ProtocolConfig,
)
from core.study.protocol.folders import protocol_eta, run_finished, run_id, run_seconds


@dataclass
class ProtocolView:
    """One protocol folder as the app shows it: settings, progress, results."""

    folder: Path
    config: ProtocolConfig
    results: dict[str, Any] | None

    @property
    def name(self) -> str:
        """The folder name (what `--name` takes)."""
        return self.folder.name

    def planned_runs(self) -> list[str]:
        """Run ids of every arm and seed (Self-Output's only once its data exists or while it
        may still be generated)."""
        return [
            run_id(self.folder, key, seed)
            for seed in self.config.seeds
            for key in self.config.methods
        ]

    def finished_runs(self) -> list[str]:
        """Planned runs whose training finished."""
        return [r for r in self.planned_runs() if run_finished(runs_dir() / r)]

    def durations(self) -> list[float]:
        """Measured seconds of each finished run (their summaries' wall time)."""
        found = [run_seconds(runs_dir() / r) for r in self.finished_runs()]
        return [d for d in found if d]

    def partial_results(self) -> dict[str, Any] | None:
        """The results over the runs finished so far (`PARTIAL_JSON`), while no final results
        exist; None otherwise."""
        if self.results is not None:
            return None
        found = read_json(self.folder / PARTIAL_JSON)
        return found if isinstance(found, dict) and found.get("arms") else None

    def eta(self, state: RunState | None, now: float | None = None) -> float | None:
        """Seconds left: the unfinished runs at the finished runs' mean duration, less what the
        running one has spent since the job's `state` said it started (None before any run
        finished)."""
        now = time.time() if now is None else now
        running = state is not None and state.phase == Phase.PROTOCOL and bool(state.detail)
        return protocol_eta(
            self.durations(),
            len(self.planned_runs()),
            len(self.finished_runs()),
            now - state.time if running and state else None,
        )

    def progress_lines(self, n: int = 20) -> list[str]:
        """The last `n` progress lines (one per step the protocol took)."""
        try:
            lines = (self.folder / PROGRESS_TXT).read_text(encoding="utf-8").splitlines()
        except OSError:
            return []
        return lines[-n:]

    def current_log(self) -> tuple[str, Path] | None:
        """(name, folder) of the step running now, by the latest progress line: the
        Self-Output generation or a training run (whose log.txt the children write)."""
        for line in reversed(self.progress_lines(200)):
            if "generating training data" in line:
                return "Self-Output generation", self.folder / GENERATION_DIR
            match = line.rsplit("training (", 1)
            if len(match) == 2 and match[1].endswith(")"):
                rid = match[1][:-1]
                return rid, runs_dir() / rid
        return None


def load_protocol(folder: str | Path) -> ProtocolView:
    """Read a protocol folder (LensError when it is not one)."""
    path = Path(folder)
    saved = read_json(path / CONFIG_JSON)
    if not isinstance(saved, dict) or saved.get("kind") != PROTOCOL_KIND:
        raise LensError(f"{path} is not a protocol folder.")
    results = read_json(path / RESULTS_JSON)
    return ProtocolView(path, ProtocolConfig.from_dict(saved), results if results else None)


def list_protocols() -> list[ProtocolView]:
    """Every protocol folder under the runs root, newest first (unreadable ones skipped)."""
    found = []
    for path in sorted(runs_dir().iterdir(), key=lambda p: p.stat().st_mtime, reverse=True):
        if path.is_dir():
            try:
                found.append(load_protocol(path))
            except LensError:
                continue
    return found
