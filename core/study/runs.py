"""Reading finished or running run folders for comparison and reports.

A run folder (written by the job system and training, see core/jobs/) holds `config.json`,
`metrics.jsonl` (train / data / eval / eval_summary / done records) and, once finished,
`summary.json`. `RunView` turns one folder into tidy frames; `drift_table` reads each run's
drift from the base model at its latest round. Lining several runs up the way the paper's
tables do (`runs_table`, the display tables, `run_findings` in sentences) is
`core.study.run_tables`, re-exported here for the pages and tests that import it from this
module.

`RunView.changes()` is the change of every task's primary metric from step 0 (the base model)
to each later evaluation round, with the paired interval over items that
`core.eval.compare.compare_results` computes from the rounds' per-item results
(`eval/step-N.json`); runs without them fall back to the recorded scores, without an interval.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import pandas as pd

from core import fmt
from core.errors import LensError
from core.eval.compare import compare_results, recorded_suite, ti_spec
from core.eval.labels import DRIFT_METRIC, finite
from core.eval.legacy import records_are_old, result_is_old
from core.eval.scorers import SuiteResult, item_scores
from core.eval.suites import DRIFT, TARGET
from core.io import file_stamp, read_json
from core.jobs.metrics import (
    DataRecord,
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
from core.study.run_tables import (
    DRIFT_READING,
    FINISHED,
    NOT_APPLICABLE,
    PINNED_COLUMNS,
    RUN_COLUMNS,
    RUN_STATES,
    SPLIT_COLUMN,
    TABLE_FACTS,
    TAU_METHODS,
    UNFINISHED,
    drift_display_table,
    final_target_change,
    run_findings,
    run_status,
    run_statuses,
    run_tau_value,
    runs_columns,
    runs_display_table,
    runs_table,
    score_columns,
)

#: This module's names, and those of `core.study.run_tables` that pages and tests import from
#: here.
__all__ = [
    "CHANGE_COLUMNS",
    "DRIFT_COLUMNS",
    "DRIFT_READING",
    "DRIFT_TABLE_METRICS",
    "FINISHED",
    "GENERATED_KINDS",
    "LOSS_PARAMETERS",
    "NLL_METRIC",
    "NOT_APPLICABLE",
    "NOT_MODEL_RUNS",
    "NO_ITEMS",
    "PINNED_COLUMNS",
    "RUN_COLUMNS",
    "RUN_STATES",
    "SPLIT_COLUMN",
    "TABLE_FACTS",
    "TAU_METHODS",
    "UNFINISHED",
    "RunView",
    "drift_display_table",
    "drift_missing",
    "drift_notes",
    "drift_rows",
    "drift_table",
    "final_target_change",
    "list_runs",
    "load_run",
    "loss_label",
    "resolve_run_dir",
    "run_findings",
    "run_status",
    "run_statuses",
    "run_tau_value",
    "runs_columns",
    "runs_display_table",
    "runs_table",
    "score_columns",
]


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
    "step",
    "base_step",
    "task",
    "metric",
    "role",
    "accuracy",
    "unit",
    "base",
    "value",
    "delta",
    "low",
    "high",
    "n",
    "reason",
    "chance",
    "at_chance",
    "is_ti",
]
NLL_METRIC = "nll"  # the reference-NLL tasks' primary metric (never the easy-token NLL)
NO_ITEMS = "no per-item results saved for this run: no interval"


#: Each token loss's parameter a run label names: (symbol, `TrainConfig` field).
LOSS_PARAMETERS = {
    "soft_stm": ("T", "loss_temperature"),
    "eaft": ("α", "eaft_alpha"),
    "kl": ("β", "kl_beta"),
    "asft": ("α", "asft_alpha"),
}


def loss_label(config: dict[str, Any]) -> str:
    """A run config's token loss with its parameter, as run labels write it: "kl β=0.1",
    "asft α=0.1 k3" (the label-token KL estimate), "dft"; "nll" when the config names none."""
    loss = str(config.get("loss") or "nll")
    text = loss
    symbol, name = LOSS_PARAMETERS.get(loss, ("", ""))
    if name and finite(config.get(name)):
        text += f" {symbol}={fmt.num(float(config[name]))}"
    if loss in ("kl", "asft") and config.get("kl_estimator") == "k3":
        text += " k3"
    return text


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
    def loss(self) -> str:
        """The token loss trained with (`TrainConfig.loss`): "nll" for plain cross-entropy, for
        runs made before there was a choice and for evaluation-only runs."""
        return str(self.config.get("loss") or "nll")

    @property
    def label(self) -> str:
        """Short label: method, tau where it matters, the token loss when it is not nll (with
        its parameter: "stm τ=2.5 + kl β=0.1"), seed."""
        text = self.method
        tau = self.data_record.get("tau", self.config.get("tau"))
        if self.method in ("stm", "random", "low") and tau is not None:
            text += f" τ={float(tau):g}"
        share = self.config.get("target_share")
        if share:
            text += f" ({100 * float(share):.0f}%)"
        if self.loss != "nll":
            text += f" + {loss_label(self.config)}"
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

    @cached_property
    def old_format(self) -> bool:
        """Whether the folder holds evaluation results as versions before the honest target
        metric wrote them (`core.eval.legacy`): they read as written until `python -m core
        migrate` rewrites them. Its first round (all of them, unless resumed since) and its
        records are checked."""
        steps = eval_round_steps(self.run_dir)
        path = eval_round_path(self.run_dir, steps[0]) if steps else None
        stamp = file_stamp(path) if path is not None else None
        if path is not None and stamp is not None:
            result = _load_round(str(path), stamp)
            if result is not None and result_is_old(result):
                return True
        return records_are_old(
            (r.step, r.task, r.metric) for r in of_kind(self.records, EvalRecord)
        )

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
        return SuiteResult.from_dict(data)
    except (TypeError, KeyError, ValueError):
        return None


@lru_cache(maxsize=1024)
def _round_rows(
    base_path: str,
    base_stamp: tuple[int, int],
    path: str,
    stamp: tuple[int, int],
    step: int,
    base_step: int,
) -> tuple[dict[str, Any], ...]:
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
                "step": step,
                "base_step": base_step,
                "task": name,
                "metric": row["metric"],
                "role": row["role"],
                "accuracy": accuracy[name],
                "unit": "points" if accuracy[name] else "nats",
                "base": row["base"],
                "value": row["tuned"],
                "delta": delta,
                "low": interval.get("low"),
                "high": interval.get("high"),
                "n": interval.get("n"),
                "reason": reason,
                "chance": row.get("chance"),
                "at_chance": bool(row.get("at_chance")),
                "is_ti": spec is not None and spec.name == name,
            }
        )
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
    for task, metric, role in zip(frame["task"], frame["metric"], frame["role"], strict=True):
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
            known = finite(base) and finite(value)
            rows.append(
                {
                    "step": step,
                    "base_step": steps[0],
                    "task": task,
                    "metric": metric,
                    "role": roles[task],
                    "accuracy": accuracy,
                    "unit": "points" if accuracy else "nats",
                    "base": float(base) if finite(base) else None,
                    "value": float(value) if finite(value) else None,
                    "delta": (100.0 if accuracy else 1.0) * (value - base) if known else None,
                    "low": None,
                    "high": None,
                    "n": None,
                    "reason": NO_ITEMS if known else "not scored in one of the two rounds",
                    "chance": None,
                    "at_chance": False,
                    "is_ti": task == ti,
                }
            )
    return rows


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


# ------------------------------------------------------------------------ drift from the base

#: The drift metrics `drift_table` gives at a run's latest round, each with its 95% interval.
DRIFT_TABLE_METRICS = ("kl", "top1_agree", "dnll", "kl_toward", "kl_away")
#: The columns of `drift_table`: one row per run, drift probe and metric at the run's latest
#: round with drift; `value` is the metric at that round (a drift metric is measured against the
#: base model itself), `low` / `high` its 95% interval over probe items (None with a `reason`).
DRIFT_COLUMNS = [
    "run",
    "label",
    "method",
    "task",
    "role",
    "step",
    "metric",
    "value",
    "low",
    "high",
    "n",
    "reason",
]


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
    tasks = sorted(
        (t for t in result.tasks if t.scorer == DRIFT and t.details), key=lambda t: t.role != TARGET
    )
    for task in tasks:
        for metric in DRIFT_TABLE_METRICS:
            items = item_scores(task, metric)
            value = task.metrics.get(metric)
            interval = None
            if items:  # the value's interval: its change from an item-wise zero, paired
                tuned = list(items.values())
                interval = paired_interval([(0.0, den) for _, den in tuned], tuned)
            rows.append(
                {
                    "task": task.name,
                    "role": task.role,
                    "step": step,
                    "metric": metric,
                    "value": float(value) if finite(value) else None,
                    "low": interval.low if interval else None,
                    "high": interval.high if interval else None,
                    "n": interval.n if interval else task.n,
                    "reason": (interval.reason if interval else "no per-item sums saved") or "",
                }
            )
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
            out[run.run_id] = (
                "no saved evaluation rounds yet"
                if run.eval_frame().empty
                else "no per-item rounds saved: evaluated before drift was measured"
            )
        elif _latest_drift_step(str(run.run_dir), stamps) is None:
            out[run.run_id] = "no drift probes in its rounds: evaluated before drift was measured"
        else:
            out[run.run_id] = (
                f"only step {stamps[0][0]} evaluated so far (the base model: no "
                "drift by definition)"
            )
    return out


def drift_notes(runs: list[RunView]) -> list[str]:
    """One sentence per run without drift in `drift_table`, saying why."""
    by_id = {run.run_id: run for run in runs}
    return [f"{by_id[r].label} · {r}: {why}." for r, why in drift_missing(runs).items()]
