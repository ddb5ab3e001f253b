"""Reading finished or running run folders for comparison and reports.

A run folder (written by the job system and training, see core/jobs/) holds `config.json`,
`metrics.jsonl` (train / data / eval / eval_summary / done records) and, once finished,
`summary.json`. `RunView` turns one folder into tidy frames; `runs_table` lines several runs up
the way the paper's tables do (target score and its change, each out-of-domain score, BWT, TI,
costs), each change with its paired 95% interval; `run_findings` says the same in sentences.

`RunView.changes()` is the change of every task's primary metric from step 0 (the base model)
to each later evaluation round, with the paired interval over items that
`core.eval.compare.compare_results` computes from the rounds' per-item results
(`eval/step-N.json`); runs without them fall back to the recorded scores, without an interval.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import pandas as pd

from core import fmt
from core.errors import LensError
from core.eval.compare import compare_results, recorded_suite, ti_spec
from core.eval.drift import DRIFT_LABELS
from core.eval.scorers import SuiteResult, item_scores
from core.eval.suites import DRIFT, REF_PPL, TARGET
from core.io import file_stamp, read_json
from core.jobs.metrics import (
    DataRecord,
    DoneRecord,
    EvalRecord,
    EvalSummaryRecord,
    MetricRecord,
    TrainRecord,
    latest,
    of_kind,
)
from core.jobs.runfiles import (
    CONFIG_JSON,
    SUMMARY_JSON,
    eval_round_path,
    eval_round_steps,
    read_records,
    runs_dir,
)
from core.stats import paired_interval
from core.viz.run_charts import (
    DRIFT_METRIC,
    change_text,
    metric_label,
    probe_description,
    probe_title,
    value_text,
)

GENERATED_KINDS = ("self_output", "rephrase")
# Run folders that hold no training or evaluation of a model: data generation, protocols.
NOT_MODEL_RUNS = (*GENERATED_KINDS, "protocol")

#: The columns of `RunView.changes()`: per evaluation round and task, the change of the task's
#: primary metric from the first round (`base_step`, normally step 0: the base model). `delta`,
#: `low`, `high` are in `unit`: points for accuracies, nats for the full-token reference NLL;
#: `low` / `high` are the paired 95% interval over items (None with a `reason`). `chance` is a
#: multiple-choice task's chance accuracy (0-1), `at_chance` whether the base model is within its
#: interval of it; `is_ti` marks the task TI is read from (the target's honest metric).
CHANGE_COLUMNS = [
    "step", "base_step", "task", "metric", "role", "accuracy", "unit", "base", "value",
    "delta", "low", "high", "n", "reason", "chance", "at_chance", "is_ti",
]  # fmt: skip
NLL_METRIC = "nll"  # the reference-NLL tasks' primary metric (never the easy-token NLL)
NO_ITEMS = "no per-item results saved for this run: no interval"


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

    def changes(self) -> pd.DataFrame:
        """The change of every task's primary metric from step 0 to each evaluation round, with
        its paired 95% interval over items (see `CHANGE_COLUMNS`)."""
        return self._changes.copy()

    @cached_property
    def _changes(self) -> pd.DataFrame:
        rows = _round_changes(self.run_dir)
        if not rows:
            rows = _record_changes(self.eval_frame())
        return pd.DataFrame(rows, columns=CHANGE_COLUMNS)

    def target_task(self) -> tuple[str, str] | None:
        """(task, metric) TI is read from: the target accuracy task, else the target's
        full-token reference NLL; None without evaluation records."""
        frame = self._changes
        ti = frame[frame["is_ti"].astype(bool)]
        return None if ti.empty else (str(ti["task"].iloc[0]), str(ti["metric"].iloc[0]))

    @property
    def final_summary(self) -> EvalSummaryRecord | None:
        """The last "eval_summary" record (TI, BWT, their intervals and notes) of a round after
        the first: None while only step 0 (the base model against itself) is evaluated."""
        found = of_kind(self.records, EvalSummaryRecord)
        first = min((int(r.step or 0) for r in found), default=0)
        later = [r for r in found if int(r.step or 0) > first]
        return later[-1] if later else None

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


@lru_cache(maxsize=32)
def _load_round(path: str, stamp: tuple[int, int]) -> SuiteResult | None:
    """One round's saved result (cached by file and modification; None when unreadable)."""
    data = read_json(path)
    if not isinstance(data, dict):
        return None
    try:
        result = SuiteResult.from_dict(data)
    except (TypeError, KeyError, ValueError):
        return None
    for task in result.tasks:  # rounds saved before the honest target metric: never nll_easy
        if task.scorer == REF_PPL and NLL_METRIC in task.metrics:
            task.primary = NLL_METRIC
    return result


@lru_cache(maxsize=1024)
def _round_rows(
    base_path: str, base_stamp: tuple[int, int], path: str, stamp: tuple[int, int], step: int,
    base_step: int,
) -> tuple[dict[str, Any], ...]:  # fmt: skip
    """The `CHANGE_COLUMNS` rows of one round against the base round, from `compare_results`
    (cached: the Runs page redraws every few seconds while a run trains)."""
    base, tuned = _load_round(base_path, base_stamp), _load_round(path, stamp)
    if base is None or tuned is None:
        return ()
    suite = recorded_suite(base)
    try:
        comparison = compare_results(base, tuned, suite)
    except LensError:  # rounds of different suite settings: not comparable
        return ()
    spec = ti_spec(suite)
    accuracy = {s.name: s.is_accuracy for s in suite.specs()}
    rows = []
    for name, row in comparison.per_task.items():
        scale = 100.0 if accuracy[name] else 1.0
        interval = row.get("delta_interval") or {}
        if row["base"] is None or row["tuned"] is None:
            delta, reason = None, "not scored in one of the two rounds"
        elif interval:
            delta, reason = interval.get("estimate"), str(interval.get("reason") or "")
        else:
            delta, reason = scale * row["delta"], "no per-item scores for this task: no interval"
        rows.append(
            {
                "step": step, "base_step": base_step, "task": name, "metric": row["metric"],
                "role": row["role"], "accuracy": accuracy[name],
                "unit": "points" if accuracy[name] else "nats", "base": row["base"],
                "value": row["tuned"], "delta": delta, "low": interval.get("low"),
                "high": interval.get("high"), "n": interval.get("n"), "reason": reason,
                "chance": row.get("chance"), "at_chance": bool(row.get("at_chance")),
                "is_ti": spec is not None and spec.name == name,
            }
        )  # fmt: skip
    return tuple(rows)


def _round_changes(run_dir: Path) -> list[dict[str, Any]]:
    """`CHANGE_COLUMNS` rows from the run's saved rounds (empty without any)."""
    steps = eval_round_steps(run_dir)
    stamps = {s: file_stamp(eval_round_path(run_dir, s)) for s in steps}
    steps = [s for s in steps if stamps[s] is not None]
    if not steps:
        return []
    first = steps[0]
    base_path = str(eval_round_path(run_dir, first))
    rows: list[dict[str, Any]] = []
    for step in steps:
        path = str(eval_round_path(run_dir, step))
        stamp, base_stamp = stamps[step], stamps[first]
        assert stamp is not None and base_stamp is not None
        rows += [dict(r) for r in _round_rows(base_path, base_stamp, path, stamp, step, first)]
    return rows


def _record_changes(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """`CHANGE_COLUMNS` rows from the "eval" records alone (a run without saved rounds): the
    changes without intervals. A task's first recorded metric is its primary one."""
    if frame.empty:
        return []
    primary: dict[str, str] = {}
    roles: dict[str, str] = {}
    recorded = set(zip(frame["task"], frame["metric"], strict=True))
    for task, metric, role in zip(frame["task"], frame["metric"], frame["role"], strict=True):
        # records written before the honest target metric put a reference task's nll_easy first
        if metric == "nll_easy" and (task, NLL_METRIC) in recorded:
            metric = NLL_METRIC
        primary.setdefault(task, metric)
        roles.setdefault(task, role)
    targets = [t for t in primary if roles[t] == "target"]
    # drift ("kl") is never a task's score: TI comes from an accuracy, else the reference NLL
    ti = next((t for t in targets if primary[t] not in (NLL_METRIC, DRIFT_METRIC)), None)
    ti = ti or next((t for t in targets if primary[t] == NLL_METRIC), None)
    values = {
        (int(step), task, metric): value
        for step, task, metric, value in zip(
            frame["step"], frame["task"], frame["metric"], frame["value"], strict=True
        )
    }
    steps = sorted({int(s) for s in frame["step"]})
    rows = []
    for step in steps:
        for task, metric in primary.items():
            if (step, task, metric) not in values:
                continue
            accuracy = metric not in (NLL_METRIC, DRIFT_METRIC)
            base, value = values.get((steps[0], task, metric)), values[(step, task, metric)]
            known = _finite(base) and _finite(value)
            rows.append(
                {
                    "step": step, "base_step": steps[0], "task": task, "metric": metric,
                    "role": roles[task], "accuracy": accuracy,
                    "unit": "points" if accuracy else "nats",
                    "base": float(base) if _finite(base) else None,
                    "value": float(value) if _finite(value) else None,
                    "delta": (100.0 if accuracy else 1.0) * (value - base) if known else None,
                    "low": None, "high": None, "n": None,
                    "reason": NO_ITEMS if known else "not scored in one of the two rounds",
                    "chance": None, "at_chance": False, "is_ti": task == ti,
                }
            )  # fmt: skip
    return rows


def _finite(value: Any) -> bool:
    """A real number (numpy's included), not NaN or infinite."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


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


#: runs_table columns that are not a task's score
TABLE_FACTS = (
    "run", "label", "status", "method", "tau", "masked %", "target", "target Δ", "target Δ low",
    "target Δ high", "target Δ unit", "BWT", "BWT low", "BWT high", "TI", "TI low", "TI high",
    "prep s", "train s", "notes",
)  # fmt: skip

#: Methods that mask by a perplexity threshold τ (for the others τ does not apply).
TAU_METHODS = ("stm", "random", "low")
#: What a table prints where a quantity does not apply to a run (τ of a ground-truth run); an
#: unknown value prints `fmt.MISSING`.
NOT_APPLICABLE = "n/a"

#: A run's state as Compare and the report name it (`run_status`).
FINISHED, UNFINISHED = "finished", "unfinished"
RUN_STATES = (FINISHED, "queued", "running", "failed", "cancelled", UNFINISHED)


def run_status(run: RunView, job_status: str | None = None) -> str:
    """One of `RUN_STATES`: the status of the run's job when one is known ("succeeded" is
    "finished"), else "finished" when the run wrote its summary or its "done" record, else
    "unfinished" (stopped before the end, or copied from elsewhere mid-run)."""
    if job_status == "succeeded":
        return FINISHED
    if job_status in RUN_STATES:
        return str(job_status)
    if run.summary or of_kind(run.records, DoneRecord):
        return FINISHED
    return UNFINISHED


def run_statuses(runs: list[RunView], jobs: Mapping[str, Any] | None = None) -> dict[str, str]:
    """Run id -> `run_status`, from `jobs` (run folder name -> job, as
    `core.jobs.registry.jobs_by_run` gives them; the job registry's when None)."""
    if jobs is None:
        from core.jobs.registry import JobRegistry, jobs_by_run

        jobs = jobs_by_run(JobRegistry().list())
    found = {run.run_id: jobs.get(run.run_id) for run in runs}
    return {
        run_id: run_status(run, getattr(found[run_id], "status", None))
        for run_id, run in zip(found, runs, strict=True)
    }


def _clean(value: Any) -> float | None:
    return float(value) if _finite(value) else None


def final_target_change(run: RunView) -> dict[str, Any] | None:
    """The `changes()` row of the TI task at the run's last evaluation round (None when the run
    has no evaluation, or only its step-0 round)."""
    frame = run.changes()
    frame = frame[frame["is_ti"].astype(bool)]
    if frame.empty or frame["step"].max() == frame["base_step"].min():
        return None
    return frame.sort_values("step").iloc[-1].to_dict()


def run_tau_value(run: RunView) -> float | None:
    """The τ a run masked by (resolved from its target share when it used one); None for the
    methods τ does not apply to (`TAU_METHODS`), whatever their config's default says."""
    if run.method not in TAU_METHODS:
        return None
    return _clean(run.data_record.get("tau", run.config.get("tau")))


def runs_table(runs: list[RunView], statuses: Mapping[str, str] | None = None) -> pd.DataFrame:
    """One row per run: method, τ (None where it does not apply), % masked, the target's change
    with its paired 95% interval, each task's score, BWT and TI with theirs, cost, and the last
    round's notes; with `statuses` (run id -> `run_status`), a "status" column.

    Scores are those of each run's primary metric per task at its last evaluation round; the
    changes are against the same run's step-0 evaluation (the base model under the same
    settings). "target Δ" is in "target Δ unit": points for an accuracy, nats for the target's
    full-token reference NLL (lower is better).
    """
    rows = []
    for run in runs:
        last = run.scores_at("last")
        summary = run.final_summary
        target = run.target_task()
        change = final_target_change(run)
        row: dict[str, Any] = {"run": run.run_id, "label": run.label}
        if statuses is not None:
            row["status"] = statuses.get(run.run_id, UNFINISHED)
        row |= {
            "method": run.method,
            "tau": run_tau_value(run),
            "masked %": None if run.masked_share is None else 100 * run.masked_share,
            "target": f"{target[0]} {target[1]}" if target else None,
            "target Δ": _clean(change["delta"]) if change else None,
            "target Δ low": _clean(change["low"]) if change else None,
            "target Δ high": _clean(change["high"]) if change else None,
            "target Δ unit": change["unit"] if change else None,
        }
        seen: set[str] = set()
        for (task, metric), value in last.items():
            if task not in seen:
                seen.add(task)
                row[f"{task} {metric}"] = value
        for name in ("bwt", "ti"):
            for suffix, field_name in (
                ("", name),
                (" low", f"{name}_low"),
                (" high", f"{name}_high"),
            ):
                value = getattr(summary, field_name) if summary else None
                row[f"{name.upper()}{suffix}"] = _clean(value)
        row["prep s"] = run.prep_seconds
        row["train s"] = run.train_seconds
        row["notes"] = " ".join(summary.notes) if summary else ""
        rows.append(row)
    return pd.DataFrame(rows)


def score_columns(table: pd.DataFrame) -> list[str]:
    """The "task metric" score columns of a `runs_table`."""
    return [c for c in table.columns if c not in TABLE_FACTS]


#: Decimals of a change per unit (points of accuracy, nats of NLL, % for BWT and TI).
CHANGE_DIGITS = {"points": 1, "nats": 3, "%": 1}


def change_cell(estimate: Any, low: Any = None, high: Any = None, unit: str = "") -> str:
    """A change as a table prints it, through `core.fmt.interval`: "+5.0 [+1.2, +8.8] points",
    "-50.0% (no interval)", or `fmt.MISSING` when there is no estimate."""
    if not _finite(estimate):
        return fmt.MISSING
    text = fmt.interval(_clean(estimate), _clean(low), _clean(high), CHANGE_DIGITS.get(unit, 1))
    suffix = unit if unit == "%" else (f" {unit}" if unit else "")
    return f"{text}{suffix}" if _finite(low) and _finite(high) else f"{text}{suffix} (no interval)"


#: Title and help text of each fact column of `runs_display_table` (score columns get theirs
#: from `runs_columns`). The page's column_config and the report's header use both.
RUN_COLUMNS: dict[str, tuple[str, str]] = {
    "run": ("Run", "The run's id: the name of its folder under the runs root."),
    "label": ("Setup", "Method, τ where it applies, target share and seed (0 is not shown)."),
    "status": (
        "Status",
        "finished, queued, running, failed or cancelled, from the run's job; unfinished: no "
        "job known and no summary written (stopped before the end).",
    ),
    "method": (
        "Method",
        "gt: ground truth, every response token trained · stm: Selective Token Masking, "
        "tokens whose perplexity under the base model exceeds τ are left out of the loss · "
        "random: the same share masked at random (control) · low: tokens below τ masked · "
        "percentile: the top k% per example masked · self_output / rephrase: ground-truth "
        "training on generated answers · base: evaluation only.",
    ),
    "tau": (
        "τ",
        "Masking threshold (a token perplexity under the base model), resolved from the target "
        f"share where a run set one. Applies to stm, random and low only: {NOT_APPLICABLE} "
        "for the other methods.",
    ),
    "masked %": (
        "Masked tokens",
        "Share of the training responses' tokens left out of the loss (0.0% for ground truth; "
        f"{NOT_APPLICABLE} for an evaluation-only run).",
    ),
    "target": ("Target metric", "The target task and metric that the target Δ and TI use."),
    "target Δ": (
        "Target Δ vs step 0",
        "Change of the target metric from the run's own step-0 evaluation (the base model) to "
        "its last round, with the paired 95% interval over evaluation items in brackets: "
        "points for an accuracy, nats for the full-token reference NLL (lower is better).",
    ),
    "BWT %": (
        "BWT (forgetting)",
        "Backward transfer: the mean relative change (%) of the out-of-domain accuracy tasks "
        "above chance from step 0 to the last round, paired 95% interval in brackets. Below "
        "zero means the run forgot.",
    ),
    "TI %": (
        "TI (target gain)",
        "Target improvement: the relative change (%) of the target metric from step 0 to the "
        "last round, paired 95% interval in brackets.",
    ),
    "prep s": (
        "Data prep time",
        "From the job's start until its training data was ready: loading, scoring under the "
        "base model and masking.",
    ),
    "train s": (
        "Training time",
        "The trainer's run time, evaluation rounds during training included.",
    ),
}
#: The columns a wide table keeps in view when scrolled sideways.
PINNED_COLUMNS = ("run", "label")


def runs_columns(table: pd.DataFrame) -> dict[str, tuple[str, str]]:
    """Column -> (title, help text) for every column of a `runs_display_table`: the facts from
    `RUN_COLUMNS`, each score column under its readable metric name."""
    out = {}
    for column in table.columns:
        if column in RUN_COLUMNS:
            out[column] = RUN_COLUMNS[column]
        else:
            task, _, metric = str(column).rpartition(" ")
            title = metric_label(task, metric) if task else str(column)
            out[column] = (
                title,
                f"{title}: the raw score at the run's last evaluation round (the Δ, BWT and TI "
                "columns compare it with step 0).",
            )
    return out


def _tau_cell(method: Any, value: Any) -> str:
    return fmt.tau(_clean(value)) if method in TAU_METHODS else NOT_APPLICABLE


def _masked_cell(method: Any, value: Any) -> str:
    if method == "base":
        return NOT_APPLICABLE
    return fmt.share(_clean(value) / 100 if _finite(value) else None)


def _duration_cell(seconds: Any) -> str:
    return fmt.duration(float(seconds)) if _finite(seconds) else fmt.MISSING


def runs_display_table(table: pd.DataFrame) -> pd.DataFrame:
    """A `runs_table` as people read it, every cell text through `core.fmt` (one rule, the same
    on the page and in the report): each change as one "estimate [95% interval]" column
    ("target Δ", "BWT %", "TI %") beside each other, τ and % masked as `fmt.tau` / `fmt.share`
    ("n/a" where they do not apply), scores as `fmt.num`, times as durations, `fmt.MISSING`
    where a value is unknown; without the bound, unit and notes columns. `runs_columns` gives
    each column's title and help text."""
    if table.empty:
        return table
    out = pd.DataFrame(index=table.index)
    for column in ("run", "label", "status", "method"):
        if column in table.columns:
            out[column] = [fmt.MISSING if v is None else str(v) for v in table[column]]
    methods = list(table["method"])
    out["tau"] = [_tau_cell(m, v) for m, v in zip(methods, table["tau"], strict=True)]
    out["masked %"] = [_masked_cell(m, v) for m, v in zip(methods, table["masked %"], strict=True)]
    out["target"] = [str(v) if isinstance(v, str) else fmt.MISSING for v in table["target"]]
    out["target Δ"] = [
        change_cell(d, lo, hi, u if isinstance(u, str) else "")
        for d, lo, hi, u in zip(
            table["target Δ"], table["target Δ low"], table["target Δ high"],
            table["target Δ unit"], strict=True,
        )
    ]  # fmt: skip
    for name in ("BWT", "TI"):
        out[f"{name} %"] = [
            change_cell(v, lo, hi, "%")
            for v, lo, hi in zip(
                table[name], table[f"{name} low"], table[f"{name} high"], strict=True
            )
        ]
    for column in score_columns(table):
        out[column] = [fmt.num(_clean(v)) for v in table[column]]
    out["prep s"] = [_duration_cell(v) for v in table["prep s"]]
    out["train s"] = [_duration_cell(v) for v in table["train s"]]
    return out.reset_index(drop=True)


def run_findings(run: RunView) -> list[str]:
    """What a run's last evaluation round says, each change with its paired 95% interval and a
    verdict read off it ("better" / "worse" only when the interval excludes zero)."""
    name = f"{run.label} · {run.run_id}"
    frame = run.changes()
    if frame.empty:
        return [f"{name}: no evaluation rounds yet."]
    if frame["step"].max() == frame["base_step"].min():
        return [f"{name}: only step {int(frame['step'].max())} evaluated so far; a change needs a "
                "later round."]  # fmt: skip
    out = []
    change = final_target_change(run)
    if change is not None:
        text = change_text(
            change["delta"], change["low"], change["high"], unit=str(change["unit"]),
            higher_is_better=bool(change["accuracy"]), n=change["n"], reason=change["reason"],
        )  # fmt: skip
        out.append(f"{name}: target {change['task']} {change['metric']} at step "
                   f"{int(change['step'])} vs step {int(change['base_step'])}: {text}.")  # fmt: skip
    summary = run.final_summary
    if summary is not None:
        for label, value, low, high in (
            ("BWT", summary.bwt, summary.bwt_low, summary.bwt_high),
            ("TI", summary.ti, summary.ti_low, summary.ti_high),
        ):
            if value is None:
                why = next((n for n in summary.notes if n.startswith(f"{label} undefined")), "")
                out.append(f"{name}: {label} at step {summary.step}: {why or 'undefined.'}")
                continue
            text = change_text(value, low, high, unit="%",
                               reason="too few items or no per-item scores")  # fmt: skip
            out.append(f"{name}: {label} at step {summary.step}: {text}.")
    return out


# ------------------------------------------------------------------------ drift from the base

#: The drift metrics `drift_table` gives at a run's latest round, each with its 95% interval.
DRIFT_TABLE_METRICS = ("kl", "top1_agree", "dnll", "kl_toward", "kl_away")
#: The columns of `drift_table`: one row per run, drift probe and metric at the run's latest
#: round with drift; `value` is the metric at that round (a drift metric is measured against the
#: base model itself), `low` / `high` its 95% interval over probe items (None with a `reason`).
DRIFT_COLUMNS = [
    "run", "label", "method", "task", "role", "step", "metric", "value", "low", "high", "n",
    "reason",
]  # fmt: skip
#: `drift_display_table`'s column of the KL split
SPLIT_COLUMN = "KL toward / away from the base's answer, nats"
#: How to read the drift table (under it on the Runs page).
DRIFT_READING = (
    "Drift from the base model at each run's latest evaluation round, on the base model's own "
    "greedy answers to each probe's prompts; brackets are 95% intervals over probe items. KL "
    "counts sharpening toward the base's own answer as drift just as it counts moving away from "
    "it, so read the split and the Δ NLL: KL toward is where the base's answer gained "
    "probability (sharpening), KL away where it lost some (toward + away = KL); a negative Δ NLL "
    "of the base's answers means the tuned model became more sure of them (sharpening), a "
    "positive one that it moved away. Top-1 agreement: the share of answer tokens whose most "
    "likely next token is still the base's."
)


def _round_stamps(run_dir: Path) -> tuple[tuple[int, tuple[int, int]], ...]:
    """(step, file stamp) of each saved round, ascending."""
    stamps = (
        (step, file_stamp(eval_round_path(run_dir, step))) for step in eval_round_steps(run_dir)
    )
    return tuple((step, stamp) for step, stamp in stamps if stamp is not None)


@lru_cache(maxsize=256)
def _latest_drift_step(run_dir: str, stamps: tuple[tuple[int, tuple[int, int]], ...]) -> int | None:
    """The newest saved round holding drift tasks (None: none does), searched from the newest
    back, so a run with drift reads one round; cached until a round file changes."""
    for step, stamp in reversed(stamps):
        result = _load_round(str(eval_round_path(run_dir, step)), stamp)
        if result is not None and any(t.scorer == DRIFT and t.details for t in result.tasks):
            return step
    return None


@lru_cache(maxsize=256)
def _drift_round_rows(path: str, stamp: tuple[int, int], step: int) -> tuple[dict[str, Any], ...]:
    """`DRIFT_COLUMNS` rows (without the run's columns) of one saved round: each drift task's
    `DRIFT_TABLE_METRICS` with a 95% bootstrap interval over its items (cached per file)."""
    result = _load_round(path, stamp)
    if result is None:
        return ()
    rows = []
    tasks = sorted((t for t in result.tasks if t.scorer == DRIFT and t.details),
                   key=lambda t: t.role != TARGET)  # fmt: skip
    for task in tasks:
        for metric in DRIFT_TABLE_METRICS:
            items = item_scores(task, metric)
            value = task.metrics.get(metric)
            interval = None
            if items:  # the value's interval: its change from an item-wise zero, paired
                tuned = list(items.values())
                interval = paired_interval([(0.0, den) for _, den in tuned], tuned)
            rows.append(
                {"task": task.name, "role": task.role, "step": step, "metric": metric,
                 "value": float(value) if _finite(value) else None,
                 "low": interval.low if interval else None,
                 "high": interval.high if interval else None,
                 "n": interval.n if interval else task.n,
                 "reason": (interval.reason if interval else "no per-item sums saved") or ""}
            )  # fmt: skip
    return tuple(rows)


def drift_rows(run: RunView) -> list[dict[str, Any]]:
    """`DRIFT_COLUMNS` rows of one run at its latest round with drift after its first round
    (empty when it has none: see `drift_missing`)."""
    stamps = _round_stamps(run.run_dir)
    step = _latest_drift_step(str(run.run_dir), stamps) if stamps else None
    if step is None or step == stamps[0][0]:
        return []
    path = eval_round_path(run.run_dir, step)
    stamp = dict(stamps)[step]
    facts = {"run": run.run_id, "label": run.label, "method": run.method}
    return [{**facts, **row} for row in _drift_round_rows(str(path), stamp, step)]


def drift_table(runs: list[RunView]) -> pd.DataFrame:
    """Drift from the base model at each run's latest round with drift (`DRIFT_COLUMNS`): per
    drift probe (target first), token KL, top-1 agreement, Δ NLL of the base's answers and the
    KL split toward / away from them, each with its 95% interval over probe items."""
    rows = [row for run in runs for row in drift_rows(run)]
    return pd.DataFrame(rows, columns=DRIFT_COLUMNS)


def drift_missing(runs: list[RunView]) -> dict[str, str]:
    """Run id -> why the run has no row in `drift_table` (only runs without one)."""
    out = {}
    for run in runs:
        if drift_rows(run):
            continue
        stamps = _round_stamps(run.run_dir)
        if not stamps:
            out[run.run_id] = ("no saved evaluation rounds yet" if run.eval_frame().empty
                               else "no per-item rounds saved: evaluated before drift was "
                               "measured")  # fmt: skip
        elif _latest_drift_step(str(run.run_dir), stamps) is None:
            out[run.run_id] = "no drift probes in its rounds: evaluated before drift was measured"
        else:
            out[run.run_id] = (f"only step {stamps[0][0]} evaluated so far (the base model: no "
                               "drift by definition)")  # fmt: skip
    return out


def drift_notes(runs: list[RunView]) -> list[str]:
    """One sentence per run without drift in `drift_table`, saying why."""
    by_id = {run.run_id: run for run in runs}
    return [f"{by_id[r].label} · {r}: {why}." for r, why in drift_missing(runs).items()]


def drift_display_table(table: pd.DataFrame) -> pd.DataFrame:
    """A `drift_table` as people read it: one row per run and probe, each metric under its
    readable name (`DRIFT_LABELS`) as "value [95% interval]", and the KL split toward / away
    from the base's answers with the share toward."""
    columns = ["run", "probe", "step", DRIFT_LABELS["kl"], DRIFT_LABELS["top1_agree"],
               DRIFT_LABELS["dnll"], SPLIT_COLUMN]  # fmt: skip
    if table.empty:
        return pd.DataFrame(columns=columns)
    out = []
    for (run, task), group in table.groupby(["run", "task"], sort=False):
        at = {str(r.metric): r for r in group.itertuples()}
        toward, away = at.get("kl_toward"), at.get("kl_away")
        split = fmt.MISSING
        if (
            toward is not None
            and away is not None
            and _finite(toward.value)
            and _finite(away.value)
        ):
            total = float(toward.value) + float(away.value)
            share = f" ({100 * float(toward.value) / total:.0f}% toward)" if total > 0 else ""
            split = f"{float(toward.value):.3f} / {float(away.value):.3f}{share}"
        first = group.iloc[0]
        out.append(
            {"run": f"{first['label']} · {run}",
             "probe": f"{probe_title(str(task))} ({probe_description(str(task))})",
             "step": int(first["step"]),
             DRIFT_LABELS["kl"]: _cell(at, "kl"),
             DRIFT_LABELS["top1_agree"]: _cell(at, "top1_agree", percent=True),
             DRIFT_LABELS["dnll"]: _cell(at, "dnll", signed=True),
             SPLIT_COLUMN: split}
        )  # fmt: skip
    return pd.DataFrame(out, columns=columns)


def _cell(at: dict[str, Any], metric: str, **kw: Any) -> str:
    """One `drift_table` metric of one run and probe as "value [interval]" ("–" if absent)."""
    row = at.get(metric)
    return fmt.MISSING if row is None else value_text(row.value, row.low, row.high, **kw)
