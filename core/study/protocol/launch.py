"""How a protocol launches its runs: every Self-Output generation and every arm and seed is a job
of the registry (`core.jobs.registry`), on the backend the protocol runs on, like any run the
Train page or `python -m core train` starts.

- `in_turn` (local): one run after the other on the protocol's device queue, the protocol
  waiting for each (the protocol job is a coordinator: it holds no slot of that queue), so the
  state says which arm and seed runs and the time left from the finished runs' pace;
- `all_at_once` (Ray, SLURM): every arm and seed submitted at once, the engine running as many
  side by side as it has resources for.

A run folder that already holds a finished run is reused, and one whose job is still active (the
protocol process was killed and started again) is waited for, not started twice. A cancelled or
failed protocol cancels the jobs it left running."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import LensError
from core.jobs.registry import FINAL_STATUSES, SUCCEEDED, Job, JobRegistry
from core.jobs.runfiles import StatusFn, log_tail, runs_dir
from core.jobs.state import Phase, RunState, StateReporter
from core.study.protocol.config import (
    GENERATION_DIR,
    Arm,
    ProtocolConfig,
    generation_config,
    train_config,
)
from core.study.protocol.folders import (
    existing_set,
    generated_set,
    protocol_eta,
    run_finished,
    run_id,
    run_seconds,
    say,
    write_partial_results,
)


@dataclass
class RunTarget:
    """Where a protocol submits its runs: the registry and a backend setting (local, Ray or
    SLURM, and the engine's address)."""

    registry: JobRegistry
    backend: str = "local"
    address: str | None = None

    @property
    def on_cluster(self) -> bool:
        return self.backend != "local"

    def submit(
        self, kind: str, config: dict[str, Any], device: str, run_dir: Path, label: str
    ) -> Job:
        """The job of one run, or the job already active on its folder (a protocol started again
        while its run still goes on)."""
        for job in self.registry.list():
            if job.active and job.kind == kind and Path(job.run_dir) == run_dir.absolute():
                return job
        return self.registry.submit(
            kind,
            config,
            device=device,
            run_dir=run_dir,
            label=label,
            backend=self.backend,
            address=self.address,
        )

    def cancel_active(self, job_ids: Sequence[str]) -> None:
        """Cancel those of `job_ids` still queued or running (the protocol was cancelled or
        failed): no orphan run is left behind."""
        for job_id in job_ids:
            with contextlib.suppress(LensError):
                if self.registry.get(job_id, refresh=False).active:
                    self.registry.cancel(job_id, wait=False)


def _reason(job: Job) -> str:
    """A job's one-line reason for not giving what it should: its error's first line; for one
    that succeeded without it (a generation that kept no sample), its log's last `error:`
    line, else its last line."""
    if job.error.strip():
        return job.error.strip().splitlines()[0]
    lines = [line.strip() for line in log_tail(Path(job.run_dir), 200).splitlines()]
    lines = [line for line in lines if line]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or [job.status])[-1]


def all_at_once(
    config: ProtocolConfig,
    folder: Path,
    arms: dict[str, Arm],
    target: RunTarget,
    status: StatusFn | None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every arm and seed as a cluster job at once (the engine runs as many side by side as it
    has resources for), the Self-Output generation beside them and its arm once its data
    exists; returns (runs, notes) like the local loop. A cancelled or failed protocol job
    cancels the child jobs it left running."""
    registry = target.registry
    notes: list[str] = []
    submitted: dict[str, dict[str, Any]] = {}  # child job id -> its runs entry
    runs: list[dict[str, Any]] = []
    total = len(config.seeds) * len(config.methods)

    def submit_arm(arm: Arm, seed: int, data: str | None) -> None:
        rid = run_id(folder, arm.key, seed)
        run_dir = runs_dir() / rid
        entry = {"arm": arm.key, "label": arm.label, "seed": seed, "run": rid}
        runs.append(entry)
        if run_finished(run_dir):
            entry.update(status="succeeded", reused=True)
            say(folder, f"{arm.label}, seed {seed}: already finished", status)
            return
        cfg = train_config(config, arm, seed, data)
        job = target.submit(
            "train", cfg, config.device, run_dir, f"{folder.name}: {arm.label}, seed {seed}"
        )
        entry.update(job=job.id, submitted=time.time())
        submitted[job.id] = entry
        say(
            folder,
            f"{arm.label}, seed {seed}: job {job.id} on the cluster, training ({rid})",
            status,
        )

    gen_job = None
    so_data: str | None = None
    if "self_output" in config.methods:
        gen_dir = folder / GENERATION_DIR
        so_data = existing_set(gen_dir)
        if so_data:
            notes.append(f"Self-Output set reused: {so_data}")
        else:
            gen_dir.mkdir(parents=True, exist_ok=True)
            gen_job = target.submit(
                "generate",
                generation_config(config),
                config.device,
                gen_dir,
                f"{folder.name}: Self-Output data",
            )
            say(folder, f"Self-Output: generating training data as job {gen_job.id}", status)
    try:
        for seed in config.seeds:
            for key in config.methods:
                if key != "self_output":
                    submit_arm(arms[key], seed, None)
        if gen_job is not None:
            done = registry.wait(gen_job.id, poll=2.0)
            found = generated_set(folder / GENERATION_DIR)
            if done.status == SUCCEEDED and found:
                so_data = found
                notes.append(f"Self-Output set generated on the cluster: {found}")
            else:
                reason = _reason(done)
                notes.append(
                    f"Self-Output skipped: generation job {done.id} {done.status} ({reason})"
                )
            say(folder, notes[-1], status)
        if so_data:
            for seed in config.seeds:
                submit_arm(arms["self_output"], seed, so_data)
        waiting = dict(submitted)
        while waiting:
            registry.refresh()  # one look at the engine per pass, not one per job
            for job_id in list(waiting):
                job = registry.get(job_id, refresh=False)
                if job.status not in FINAL_STATUSES:
                    continue
                entry = waiting.pop(job_id)
                entry.pop("submitted")
                entry["seconds"] = (job.finished or time.time()) - (job.started or time.time())
                if job.status == SUCCEEDED and run_finished(runs_dir() / entry["run"]):
                    entry["status"] = "succeeded"
                    say(folder, f"{entry['label']}, seed {entry['seed']}: done", status)
                    try:  # the table so far, as each run finishes
                        write_partial_results(config, folder, runs, total)
                    except Exception as exc:  # noqa: BLE001 - never stops the protocol
                        print(f"partial results not written: {exc}", flush=True)
                else:
                    entry.update(status="failed", error=_reason(job))
                    say(
                        folder,
                        f"{entry['label']}, seed {entry['seed']}: {job.status} ({entry['error']})",
                        status,
                    )
            if waiting:
                if isinstance(status, StateReporter):
                    status.report(
                        RunState(
                            Phase.PROTOCOL,
                            done=total - len(waiting),
                            total=total,
                            unit="runs",
                            detail=f"{len(waiting)} on the cluster",
                        )
                    )
                elif status:
                    status(f"{total - len(waiting)} of {total} runs finished on the cluster")
                time.sleep(2.0)
    except BaseException:  # cancelled or failed: leave no orphan on the cluster
        target.cancel_active([*submitted, *([gen_job.id] if gen_job else [])])
        raise
    return runs, notes


def _report(
    status: StatusFn | None,
    finished: int,
    planned: int,
    detail: str,
    durations: Sequence[float],
    started: float,
) -> None:
    """The protocol's state: k of N runs finished, what runs now, the time left."""
    if isinstance(status, StateReporter):
        eta = protocol_eta(durations, planned, finished, 0.0 if finished < planned else None)
        status.report(
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


def _run_one(
    target: RunTarget, kind: str, config: dict[str, Any], device: str, run_dir: Path, label: str
) -> Job:
    """Submit one run and wait for it to end; cancelled with the protocol."""
    job = target.submit(kind, config, device, run_dir, label)
    try:
        return target.registry.wait(job.id, poll=1.0)
    except BaseException:
        target.cancel_active([job.id])
        raise


def _self_output_data(
    config: ProtocolConfig, folder: Path, target: RunTarget, status: StatusFn | None
) -> tuple[str | None, str]:
    """Generate (or reuse) the Self-Output set; returns (set folder or None, note)."""
    gen_dir = folder / GENERATION_DIR
    found = existing_set(gen_dir)
    if found:
        return found, f"Self-Output set reused: {found}"
    gen_dir.mkdir(parents=True, exist_ok=True)
    say(folder, "Self-Output: generating training data", status)
    started = time.monotonic()
    done = _run_one(
        target,
        "generate",
        generation_config(config),
        config.device,
        gen_dir,
        f"{folder.name}: Self-Output data",
    )
    found = generated_set(gen_dir)
    if done.status != SUCCEEDED or not found:
        return (
            None,
            f"Self-Output skipped: generation job {done.id} {done.status} ({_reason(done)})",
        )
    return found, f"Self-Output set generated in {time.monotonic() - started:.0f} s: {found}"


def in_turn(
    config: ProtocolConfig,
    folder: Path,
    arms: dict[str, Arm],
    target: RunTarget,
    status: StatusFn | None,
    started: float,
) -> tuple[list[dict[str, Any]], list[str]]:
    """The Self-Output data, then every arm and seed, one job after the other; returns (runs,
    notes) like `all_at_once`."""
    notes: list[str] = []
    data: dict[str, str | None] = {}
    planned = len(config.seeds) * len(config.methods)
    if "self_output" in config.methods:
        _report(status, 0, planned, "the Self-Output data generation", [], started)
        data["self_output"], note = _self_output_data(config, folder, target, status)
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
        _report(status, i - 1, len(plan), f"{arm.label}, seed {seed}", durations, started)
        if i > 1:
            try:  # the table so far, as each run finishes (clearly partial on the page)
                write_partial_results(config, folder, runs, len(plan))
            except Exception as exc:  # noqa: BLE001 - partial results never stop the protocol
                print(f"partial results not written: {exc}", flush=True)
        say(folder, f"[{i}/{len(plan)}] {arm.label}, seed {seed}: training ({rid})", status)
        cfg = train_config(config, arm, seed, data.get(arm.key))
        label = f"{folder.name}: {arm.label}, seed {seed}"
        done = _run_one(target, "train", cfg, config.device, run_dir, label)
        took = (done.finished or time.time()) - (done.started or time.time())
        if done.status == SUCCEEDED and run_finished(run_dir):
            runs.append({**entry, "status": "succeeded", "seconds": took, "job": done.id})
            durations.append(took)
            say(folder, f"[{i}/{len(plan)}] done in {took:.0f} s", status)
        else:
            reason = _reason(done)
            runs.append({**entry, "status": "failed", "seconds": took, "error": reason})
            say(folder, f"[{i}/{len(plan)}] {done.status}: {reason}", status)
    return runs, notes
