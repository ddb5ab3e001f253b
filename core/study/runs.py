"""Reading finished or running run folders for comparison and reports.

A run folder (written by the job system and training, see core/jobs/) holds `config.json`,
`metrics.jsonl` (train / data / eval / eval_summary / done records) and, once finished,
`summary.json`. `RunView` turns one folder into tidy frames; `runs_table` lines several runs up
the way the paper's tables do (target score and its change, each out-of-domain score, BWT, TI,
costs).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from core.errors import LensError
from core.io import read_json
from core.jobs.metrics import (
    DataRecord,
    EvalRecord,
    EvalSummaryRecord,
    MetricRecord,
    TrainRecord,
    latest,
    of_kind,
)
from core.jobs.runfiles import CONFIG_JSON, SUMMARY_JSON, read_records, runs_dir

GENERATED_KINDS = ("self_output", "rephrase")
# Run folders that hold no training or evaluation of a model: data generation, protocols.
NOT_MODEL_RUNS = (*GENERATED_KINDS, "protocol")


@dataclass
class RunView:
    """One run folder, read once."""

    run_id: str
    run_dir: Path
    config: dict[str, Any]
    summary: dict[str, Any]
    records: list[MetricRecord] = field(repr=False)

    @property
    def data_record(self) -> dict[str, Any]:
        """The training-data facts (method, tau, masked share, fully masked count)."""
        data = latest(self.records, DataRecord)
        return dict(data.fields) if data else dict(self.summary.get("data") or {})

    @property
    def method(self) -> str:
        """Training method (gt, stm, random, ...; self_output / rephrase for ground-truth
        training on a generated set), or "base" for an evaluation-only run."""
        method = str(self.config.get("method") or self.data_record.get("method") or "base")
        if method == "gt" and self.config.get("data"):
            manifest = read_json(Path(str(self.config["data"])) / "manifest.json")
            if isinstance(manifest, dict) and manifest.get("kind") in GENERATED_KINDS:
                return str(manifest["kind"])
        return method

    @property
    def label(self) -> str:
        """Short label: method, tau where it matters, seed."""
        text = self.method
        tau = self.data_record.get("tau", self.config.get("tau"))
        if self.method in ("stm", "random", "low") and tau is not None:
            text += f" τ={float(tau):g}"
        share = self.config.get("target_share")
        if share:
            text += f" ({100 * float(share):.0f}%)"
        if self.config.get("seed") not in (None, 0):
            text += f" seed {self.config['seed']}"
        return text

    @property
    def masked_share(self) -> float | None:
        """Pooled share of response tokens masked in training (0 for gt, None if unknown)."""
        share = self.data_record.get("masked_share")
        if share is None:
            return 0.0 if self.method == "gt" else None
        return float(share)

    def train_frame(self) -> pd.DataFrame:
        """Loss curve: step, epoch, loss, lr, time."""
        rows = [asdict(r) for r in of_kind(self.records, TrainRecord) if r.loss is not None]
        frame = pd.DataFrame(rows, columns=["step", "epoch", "loss", "lr", "time"])
        return frame.astype({"step": "int64"}) if not frame.empty else frame

    def eval_frame(self) -> pd.DataFrame:
        """Evaluation records: step, task, metric, value, n, role."""
        rows = [asdict(r) for r in of_kind(self.records, EvalRecord)]
        return pd.DataFrame(rows, columns=["step", "task", "metric", "value", "n", "role"])

    def summary_frame(self) -> pd.DataFrame:
        """BWT and TI over steps, with their paired 95% interval bounds over items (NaN where
        the run's results carry none)."""
        rows = [asdict(r) for r in of_kind(self.records, EvalSummaryRecord)]
        columns = ["step", "bwt", "ti", "bwt_low", "bwt_high", "ti_low", "ti_high"]
        return pd.DataFrame(rows, columns=columns)

    def scores_at(self, which: str = "last") -> dict[tuple[str, str], float]:
        """(task, metric) -> value at the first ("base") or last evaluated step."""
        frame = self.eval_frame()
        if frame.empty:
            return {}
        step = frame["step"].min() if which == "base" else frame["step"].max()
        at = frame[frame["step"] == step]
        return {(r.task, r.metric): float(r.value) for r in at.itertuples()}

    def roles(self) -> dict[str, str]:
        """task -> role (target / ood) as recorded."""
        frame = self.eval_frame()
        return dict(zip(frame["task"], frame["role"], strict=False)) if not frame.empty else {}

    @property
    def final_bwt_ti(self) -> tuple[float | None, float | None]:
        """BWT and TI at the last evaluation round (None when not computable)."""
        frame = self.summary_frame()
        if frame.empty:
            return None, None
        last = frame.iloc[-1]

        def clean(v: Any) -> float | None:
            return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

        return clean(last["bwt"]), clean(last["ti"])

    @property
    def train_seconds(self) -> float | None:
        """Trainer run time."""
        value = self.summary.get("train_runtime_s")
        return None if value is None else float(value)

    @property
    def prep_seconds(self) -> float | None:
        """Data preparation (loading, scoring under the base model, masking): from the job's
        start to the moment its training data was ready."""
        first = of_kind(self.records, DataRecord)
        finished, wall = self.summary.get("finished"), self.summary.get("wall_time_s")
        if not first or finished is None or wall is None:
            return None
        return max(0.0, first[0].time - (float(finished) - float(wall)))


def resolve_run_dir(run: str | Path) -> Path:
    """A run folder from a path or a run id under the runs root."""
    path = Path(run)
    if path.is_dir():
        return path
    candidate = runs_dir() / str(run)
    if candidate.is_dir():
        return candidate
    raise LensError(f"No run '{run}': not a folder and not a run id under {runs_dir()}.")


def load_run(run: str | Path) -> RunView:
    """Read one run folder (raises LensError when it is not a run)."""
    folder = resolve_run_dir(run)
    config = read_json(folder / CONFIG_JSON)
    if not isinstance(config, dict):
        raise LensError(f"{folder} is not a run folder (no readable {CONFIG_JSON}).")
    summary = read_json(folder / SUMMARY_JSON)
    return RunView(
        run_id=folder.name,
        run_dir=folder,
        config=config.get("config", config) if "config" in config else config,
        summary=summary if isinstance(summary, dict) else {},
        records=read_records(folder),
    )


def _is_model_run(folder: Path) -> bool:
    config = read_json(folder / CONFIG_JSON)
    return isinstance(config, dict) and config.get("kind") not in NOT_MODEL_RUNS


def list_runs(root: str | Path | None = None) -> list[RunView]:
    """Every training or evaluation run folder under the runs root, newest first (data
    generation and protocol folders are left out: they hold no model's scores)."""
    base = Path(root) if root else runs_dir()
    if not base.is_dir():
        return []
    folders = [p for p in base.iterdir() if _is_model_run(p)]
    folders.sort(key=lambda p: p.stat().st_mtime, reverse=True)
    return [load_run(p) for p in folders]


def _pct_change(new: float, old: float) -> float | None:
    return None if old == 0 else 100.0 * (new - old) / old


def runs_table(runs: list[RunView]) -> pd.DataFrame:
    """One row per run: method, τ, % masked, target score and change, OOD scores, BWT, TI, cost.

    Scores are those of each run's first metric per task at its last evaluation round; the change
    is against the same run's step-0 evaluation (the base model under the same settings).
    """
    rows = []
    for run in runs:
        last, base, roles = run.scores_at("last"), run.scores_at("base"), run.roles()
        bwt, ti = run.final_bwt_ti
        row: dict[str, Any] = {
            "run": run.run_id,
            "label": run.label,
            "method": run.method,
            "tau": run.data_record.get("tau", run.config.get("tau")),
            "masked %": None if run.masked_share is None else 100 * run.masked_share,
        }
        seen: set[str] = set()
        for (task, metric), value in last.items():
            if task in seen:
                continue
            seen.add(task)
            role = roles.get(task, "ood")
            name = f"{task} {metric}"
            row[name] = value
            if role == "target":
                row["target"] = name
                if (task, metric) in base:
                    row["target Δ%"] = _pct_change(value, base[(task, metric)])
        row["BWT"] = bwt
        row["TI"] = ti
        row["prep s"] = run.prep_seconds
        row["train s"] = run.train_seconds
        rows.append(row)
    return pd.DataFrame(rows)
