"""Running a protocol: the runs through the registry (`core.study.protocol.launch`: in turn on
the local queue, all at once on a cluster), then the aggregation, `results.json` / `results.md`
and the report; and the "protocol" job's entry point, `run_job`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from core.errors import LensError
from core.io import read_json, write_json_atomic
from core.jobs.registry import Job, JobRegistry
from core.jobs.runfiles import CONFIG_JSON, StatusFn, read_metrics, runs_dir
from core.jobs.state import Phase, RunState, StateReporter
from core.study.protocol.config import (
    GENERATION_DIR,
    REPORT_HTML,
    RESULTS_JSON,
    RESULTS_MD,
    ProtocolConfig,
    arm_specs,
)
from core.study.protocol.folders import protocol_folder, say
from core.study.protocol.launch import RunTarget, all_at_once, in_turn
from core.study.protocol.prose import results_markdown, write_protocol_report
from core.study.protocol.results import aggregate


def _generation_span(folder: Path) -> list[tuple[float, float]]:
    """(first, last) record time of the Self-Output generation run, if any."""
    times = [float(r["time"]) for r in read_metrics(folder / GENERATION_DIR) if "time" in r]
    return [(min(times), max(times))] if times else []


def run_protocol(
    config: ProtocolConfig,
    folder: str | Path,
    *,
    status: StatusFn | None = None,
    target: RunTarget | None = None,
) -> dict[str, Any]:
    """Run (or resume) the protocol in `folder`; returns the results also written there.

    Every run is a job of the registry (`target`; default: this runs folder's registry, the
    local backend): locally each arm and seed trains in turn on the device's queue; on a
    cluster all of them are submitted at once and run side by side.

    Raises `LensError` when no arm produced a run; an arm that failed for some seeds is
    reported with the failures and the seeds that did finish.
    """
    folder = protocol_folder(config, run_dir=folder)
    folder.mkdir(parents=True, exist_ok=True)
    if read_json(folder / CONFIG_JSON) is None:
        write_json_atomic(folder / CONFIG_JSON, config.to_dict())
    started = time.monotonic()
    say(folder, config.describe(), status)
    arms = arm_specs(config)
    target = target or RunTarget(JobRegistry())
    runs, notes = (
        all_at_once(config, folder, arms, target, status)
        if target.on_cluster
        else in_turn(config, folder, arms, target, status, started)
    )
    return _conclude(config, folder, runs, notes, started, status)


def _conclude(
    config: ProtocolConfig,
    folder: Path,
    runs: list[dict[str, Any]],
    notes: list[str],
    started: float,
    status: StatusFn | None,
) -> dict[str, Any]:
    """Aggregate the finished runs, write results.json / results.md and the report."""
    finished = [r["run"] for r in runs if r["status"] == "succeeded"]
    if not finished:
        raise LensError(f"No protocol run finished; see the logs under {runs_dir()}.")
    say(folder, f"aggregating {len(finished)} run(s)", status)
    if isinstance(status, StateReporter):
        status.report(
            RunState(
                Phase.PROTOCOL,
                done=len(finished),
                total=len(runs),
                unit="runs",
                detail="the aggregation and the report",
            )
        )
    results = aggregate(
        config, runs, notes, time.monotonic() - started, spans=_generation_span(folder)
    )
    write_json_atomic(folder / RESULTS_JSON, results)
    markdown = results_markdown(results)
    (folder / RESULTS_MD).write_text(markdown, encoding="utf-8")
    say(folder, "writing the report", status)
    write_protocol_report(results, finished, folder / REPORT_HTML)
    results["report"] = str(folder / REPORT_HTML)
    write_json_atomic(folder / RESULTS_JSON, results)
    print(markdown, flush=True)
    say(folder, f"protocol finished in {time.monotonic() - started:.0f} s: {folder}", status)
    return results


def run_job(job: Job, registry: JobRegistry) -> None:
    """Entry point of a "protocol" job process (see `core.jobs.jobmain`): its runs go to the
    backend it runs on (a protocol on Ray submits its arms to the same Ray cluster)."""
    config = ProtocolConfig.from_dict(job.config)

    # the protocol's state (k of N runs finished, the arm and seed running, the time left):
    # run_state.json in the protocol folder, the status line and the log
    status = StateReporter(job.path, lambda message: registry.set_message(job.id, message))
    target = RunTarget(registry, job.backend, job.engine_address)
    run_protocol(config, job.path, status=status, target=target)
