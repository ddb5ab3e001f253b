"""Running a protocol: the Self-Output data, then every arm and seed as a `python -m core train`
child process in turn (or all at once on a cluster: `core.study.protocol.cluster`), then the
aggregation, `results.json` / `results.md` and the report; and the "protocol" job's entry
point, `run_job`."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.errors import LensError
from core.io import read_json, write_json_atomic
from core.jobs.registry import PROJECT_ROOT, core_process_env
from core.jobs.runfiles import CONFIG_JSON, StatusFn, log_tail, read_metrics, runs_dir
from core.jobs.state import Phase, RunState, StateReporter
from core.study.protocol.cluster import ClusterTarget, cluster_jobs
from core.study.protocol.config import (
    GENERATION_DIR,
    REPORT_HTML,
    RESULTS_JSON,
    RESULTS_MD,
    ProtocolConfig,
    arm_specs,
    generation_config,
    train_config,
)
from core.study.protocol.folders import (
    existing_set,
    generated_set,
    protocol_eta,
    protocol_folder,
    run_finished,
    run_id,
    run_seconds,
    say,
    write_partial_results,
)
from core.study.protocol.prose import results_markdown, write_protocol_report
from core.study.protocol.results import aggregate


def _report(
    reporter: StateReporter | None,
    finished: int,
    planned: int,
    detail: str,
    durations: Sequence[float],
    started: float,
) -> None:
    """The protocol's state: k of N runs finished, what runs now, the time left."""
    if reporter is not None:
        eta = protocol_eta(durations, planned, finished, 0.0 if finished < planned else None)
        reporter.report(
            RunState(
                Phase.PROTOCOL,
                done=finished,
                total=planned,
                unit="runs",
                detail=detail,
                elapsed_s=time.monotonic() - started,
                eta_s=eta,
            )
        )


def _run_cli(args: list[str], log_path: Path) -> int:
    """`python -m core ARGS` in a child process, its output appended to `log_path`. The child is
    stopped when this process is (cancel, Ctrl-C)."""
    env = core_process_env()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "core", *args],
            cwd=PROJECT_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            return proc.wait()
        finally:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _last_error(log_path: Path) -> str:
    """The child's one-line reason (its last `error:` line), else its last line."""
    lines = [line.strip() for line in log_tail(log_path.parent, 200).splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or ["no output"])[-1]


def _generation_span(folder: Path) -> list[tuple[float, float]]:
    """(first, last) record time of the Self-Output generation run, if any."""
    times = [float(r["time"]) for r in read_metrics(folder / GENERATION_DIR) if "time" in r]
    return [(min(times), max(times))] if times else []


def _self_output_data(
    config: ProtocolConfig, folder: Path, status: StatusFn | None
) -> tuple[str | None, str]:
    """Generate (or reuse) the Self-Output set; returns (set folder or None, note)."""
    gen_dir = folder / GENERATION_DIR
    found = existing_set(gen_dir)
    if found:
        return found, f"Self-Output set reused: {found}"
    gen_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = gen_dir / "protocol-generate.json"
    write_json_atomic(cfg_path, generation_config(config))
    say(folder, "Self-Output: generating training data", status)
    started = time.monotonic()
    code = _run_cli(
        ["generate", "--config", str(cfg_path), "--run-dir", str(gen_dir)], gen_dir / "log.txt"
    )
    found = generated_set(gen_dir)
    if code != 0 or not found:
        reason = _last_error(gen_dir / "log.txt")
        return None, f"Self-Output skipped: generation ended with {code} ({reason})"
    return found, f"Self-Output set generated in {time.monotonic() - started:.0f} s: {found}"


def run_protocol(
    config: ProtocolConfig,
    folder: str | Path,
    *,
    status: StatusFn | None = None,
    cluster: ClusterTarget | None = None,
) -> dict[str, Any]:
    """Run (or resume) the protocol in `folder`; returns the results also written there.

    Locally every arm and seed trains in turn in a child process; with `cluster`, all of them
    are submitted as jobs at once and run side by side on the cluster.

    Raises `LensError` when no arm produced a run; an arm that failed for some seeds is
    reported with the failures and the seeds that did finish.
    """
    folder = protocol_folder(config, run_dir=folder)
    folder.mkdir(parents=True, exist_ok=True)
    if read_json(folder / CONFIG_JSON) is None:
        write_json_atomic(folder / CONFIG_JSON, config.to_dict())
    started = time.monotonic()
    say(folder, config.describe(), status)
    reporter = status if isinstance(status, StateReporter) else None
    arms = arm_specs(config)
    if cluster is not None:
        runs, notes = cluster_jobs(config, folder, arms, cluster, status)
        return _conclude(config, folder, runs, notes, started, status)
    notes: list[str] = []
    data: dict[str, str | None] = {}
    planned = len(config.seeds) * len(config.methods)
    if "self_output" in config.methods:
        _report(reporter, 0, planned, "the Self-Output data generation", [], started)
        data["self_output"], note = _self_output_data(config, folder, status)
        notes.append(note)
        say(folder, note, status)
    plan = [
        (arms[key], seed)
        for seed in config.seeds
        for key in config.methods
        if key != "self_output" or data.get("self_output")
    ]
    runs: list[dict[str, Any]] = []
    durations: list[float] = []  # measured seconds of each finished run: the ETA's pace
    for i, (arm, seed) in enumerate(plan, start=1):
        rid = run_id(folder, arm.key, seed)
        run_dir = runs_dir() / rid
        entry = {"arm": arm.key, "label": arm.label, "seed": seed, "run": rid}
        if run_finished(run_dir):
            say(folder, f"[{i}/{len(plan)}] {arm.label}, seed {seed}: already finished", status)
            runs.append({**entry, "status": "succeeded", "reused": True})
            took = run_seconds(run_dir)
            durations.extend([took] if took else [])
            continue
        _report(reporter, i - 1, len(plan), f"{arm.label}, seed {seed}", durations, started)
        if i > 1:
            try:  # the table so far, as each run finishes (clearly partial on the page)
                write_partial_results(config, folder, runs, len(plan))
            except Exception as exc:  # noqa: BLE001 - partial results never stop the protocol
                print(f"partial results not written: {exc}", flush=True)
        cfg = train_config(config, arm, seed, data.get(arm.key))
        run_dir.mkdir(parents=True, exist_ok=True)
        cfg_path = run_dir / "protocol-train.json"
        write_json_atomic(cfg_path, cfg)
        say(folder, f"[{i}/{len(plan)}] {arm.label}, seed {seed}: training ({rid})", status)
        t0 = time.monotonic()
        code = _run_cli(
            ["train", "--config", str(cfg_path), "--run-dir", str(run_dir)], run_dir / "log.txt"
        )
        took = time.monotonic() - t0
        if code == 0 and run_finished(run_dir):
            runs.append({**entry, "status": "succeeded", "seconds": took})
            durations.append(took)
            say(folder, f"[{i}/{len(plan)}] done in {took:.0f} s", status)
        else:
            reason = _last_error(run_dir / "log.txt")
            runs.append({**entry, "status": "failed", "seconds": took, "error": reason})
            say(folder, f"[{i}/{len(plan)}] failed ({code}): {reason}", status)
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


def run_job(job: Any, registry: Any) -> None:
    """Entry point of a "protocol" job process (see `core.jobs.registry.run_job_process`)."""
    config = ProtocolConfig.from_dict(job.config)

    # the protocol's state (k of N runs finished, the arm and seed running, the time left):
    # run_state.json in the protocol folder, the status line and the log
    status = StateReporter(job.path, lambda message: registry.set_message(job.id, message))
    cluster = None
    if getattr(job, "on_cluster", False):  # its arms go to the same cluster, all at once
        cluster = ClusterTarget(registry, job.backend, job.engine_address)
    run_protocol(config, job.path, status=status, cluster=cluster)
