"""A protocol on a cluster: every arm and seed submitted at once as a train job of the same
backend (Ray or SLURM) the protocol job runs on, the Self-Output generation beside them."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import LensError
from core.jobs.registry import FINAL_STATUSES, SUCCEEDED, JobRegistry
from core.jobs.runfiles import StatusFn, runs_dir
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
    run_finished,
    run_id,
    say,
    write_partial_results,
)


@dataclass
class ClusterTarget:
    """Where a protocol on a cluster submits its arms: the registry and a backend setting."""

    registry: JobRegistry
    backend: str
    address: str | None


def cluster_jobs(
    config: ProtocolConfig,
    folder: Path,
    arms: dict[str, Arm],
    target: ClusterTarget,
    status: StatusFn | None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every arm and seed as a cluster job at once (the engine runs as many side by side as it
    has resources for), the Self-Output generation beside them and its arm once its data
    exists; returns (runs, notes) like the local loop. A cancelled or failed protocol job
    cancels the child jobs it left running."""
    registry = target.registry
    where = {"backend": target.backend, "address": target.address}
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
        job = registry.submit(
            "train",
            cfg,
            device=config.device,
            run_dir=run_dir,
            label=f"{folder.name}: {arm.label}, seed {seed}",
            **where,
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
            gen_job = registry.submit(
                "generate",
                generation_config(config),
                device=config.device,
                run_dir=gen_dir,
                label=f"{folder.name}: Self-Output data",
                **where,
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
                reason = (done.error or done.status).splitlines()[0]
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
                entry["seconds"] = (job.finished or time.time()) - entry.pop("submitted")
                if job.status == SUCCEEDED and run_finished(runs_dir() / entry["run"]):
                    entry["status"] = "succeeded"
                    say(folder, f"{entry['label']}, seed {entry['seed']}: done", status)
                    try:  # the table so far, as each run finishes
                        write_partial_results(config, folder, runs, total)
                    except Exception as exc:  # noqa: BLE001 - never stops the protocol
                        print(f"partial results not written: {exc}", flush=True)
                else:
                    entry.update(status="failed", error=(job.error or job.status).splitlines()[0])
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
        for job_id in [*submitted, *([gen_job.id] if gen_job else [])]:
            try:
                if registry.get(job_id, refresh=False).active:
                    registry.cancel(job_id, wait=False)
            except LensError:
                pass
        raise
    return runs, notes
