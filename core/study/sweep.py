"""A τ sweep: one training run per τ, plus ground truth and the random-mask control, on the same
data, preset and seeds, queued as train jobs of the registry like any other run.

The Compare page's "τ sweep" tab and `python -m core sweep` both build a `SweepConfig` and call
`submit_sweep`; the runs then show on the Runs and Compare pages (Compare's "score vs % masked"
and frontier read them as a sweep).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

from core.config import JobConfig, help_meta, parse_list
from core.data.tasks import get_task
from core.errors import LensError
from core.jobs.registry import FINAL_STATUSES, Job, JobRegistry
from core.masking import DEFAULT_TAU
from core.training.config import PRESETS as TRAIN_PRESETS
from core.training.config import TrainConfig


@dataclass
class SweepConfig(JobConfig):
    """What a τ sweep trains: the τ values, the controls, the seeds and the runs' shared settings."""

    COMMAND: ClassVar[str] = "sweep"
    LABEL: ClassVar[str] = "sweep"

    train_preset: str = field(
        default="cpu-quick",
        metadata=help_meta(
            "training preset of every run (core.training.config)",
            flag="preset",
            choices=tuple(TRAIN_PRESETS),
        ),
    )
    model: str = field(default="default", metadata=help_meta("model of every run"))
    task: str = field(default="mbpp", metadata=help_meta("built-in task to train on"))
    limit: int | None = field(default=64, metadata=help_meta("first N examples (none = all)"))
    taus: list[float] = field(
        default_factory=lambda: [1.5, 2.0, 2.5, 3.0, 10.0],
        metadata=help_meta("τ values of the STM runs, e.g. 1.5,2,2.5", parse=parse_list(float)),
    )
    ground_truth: bool = field(
        default=True, metadata=help_meta("also train on the ground truth (no mask)")
    )
    random_control: bool = field(
        default=True,
        metadata=help_meta(f"also train the random-mask control at τ = {DEFAULT_TAU:g}"),
    )
    seeds: list[int] = field(
        default_factory=lambda: [0], metadata=help_meta("seeds, e.g. 0,1,2 (every run per seed)")
    )
    eval_every: int | None = field(
        default=None, metadata=help_meta("evaluate every N steps (none = off)")
    )

    def __post_init__(self) -> None:
        self.taus = [float(t) for t in self.taus]
        self.seeds = [int(s) for s in self.seeds]
        self.validate()

    def validate(self) -> None:
        """Raise `LensError` with one line on a bad setting."""
        checks = [
            (
                self.train_preset in TRAIN_PRESETS,
                f"Unknown preset '{self.train_preset}' (use {', '.join(TRAIN_PRESETS)}).",
            ),
            (
                all(t > 0 for t in self.taus),
                "τ values must be positive numbers separated by commas, e.g. 1.5, 2, 2.5.",
            ),
            (len(set(self.taus)) == len(self.taus), "A τ value is named twice."),
            (
                bool(self.taus) or self.ground_truth or self.random_control,
                "Name at least one τ value or a control.",
            ),
            (bool(self.seeds), "Name at least one seed."),
            (len(set(self.seeds)) == len(self.seeds), "A seed is named twice."),
            (self.limit is None or self.limit >= 1, "limit must be at least 1 (or none)."),
            (
                self.eval_every is None or self.eval_every >= 1,
                "eval_every must be at least 1 (or none).",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise LensError(message)
        get_task(self.task)  # an unknown task: one line, before any job exists

    def runs(self) -> list[TrainConfig]:
        """Every run's training config: per seed, ground truth, STM at each τ, the control."""
        plans: list[tuple[str, float | None]] = [("gt", None)] if self.ground_truth else []
        plans += [("stm", t) for t in self.taus]
        plans += [("random", DEFAULT_TAU)] if self.random_control else []
        out = []
        for seed in self.seeds:
            for method, tau in plans:
                overrides: dict[str, Any] = {
                    "model": self.model,
                    "task": self.task,
                    "split": "train",
                    "limit": self.limit,
                    "method": method,
                    "seed": seed,
                    "eval_every": self.eval_every,
                }
                if tau is not None:
                    overrides["tau"] = tau
                out.append(TrainConfig.from_preset(self.train_preset, **overrides))
        return out

    def describe(self) -> str:
        """One line: how many runs of what."""
        n = len(self.runs())
        taus = ", ".join(f"{t:g}" for t in self.taus) or "none"
        return (
            f"τ sweep: {n} runs on {self.task} (τ {taus}"
            f"{', ground truth' if self.ground_truth else ''}"
            f"{', random control' if self.random_control else ''}) x {len(self.seeds)} seed(s), "
            f"preset {self.train_preset}"
        )


def submit_sweep(
    config: SweepConfig,
    registry: JobRegistry | None = None,
    *,
    backend: str | None = None,
    address: str | None = None,
) -> list[Job]:
    """Queue every run of the sweep as a train job (the backend setting as any submit); returns
    the jobs in the order of `config.runs()`. A refused submit (a cluster that does not answer)
    cancels the ones already queued, so a sweep is queued whole or not at all."""
    registry = registry or JobRegistry()
    jobs: list[Job] = []
    try:
        for run in config.runs():
            jobs.append(
                registry.submit(
                    "train",
                    run.to_dict(),
                    device=run.device,
                    label=run.describe(),
                    backend=backend,
                    address=address,
                )
            )
    except LensError:
        for job in jobs:
            if registry.get(job.id, refresh=False).active:
                registry.cancel(job.id, wait=False)
        raise
    return jobs


def wait_for(registry: JobRegistry, jobs: list[Job], poll: float = 2.0) -> list[Job]:
    """Until every job has ended; returns them as they ended."""
    pending = {job.id for job in jobs}
    while pending:
        registry.refresh()
        pending = {
            i for i in pending if registry.get(i, refresh=False).status not in FINAL_STATUSES
        }
        if pending:
            time.sleep(poll)
    return [registry.get(job.id, refresh=False) for job in jobs]
