"""Several runs lined up the way the paper's tables do, and what they say in sentences.

`runs_table` gives one row per run (method, token loss, τ, % masked, the target's change, each task's
score, BWT and TI, each change with its paired 95% interval, costs); `runs_display_table` writes
it as people read it, every cell through `core.fmt`, with `runs_columns` giving each column's
title and help text; `run_findings` says what a run's last round found, with the verdict read off
each interval. `drift_display_table` writes a `drift_table` (`core.study.runs`) the same way.
Runs are `core.study.runs.RunView`s; `run_status` names the state of each.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import pandas as pd

from core import fmt
from core.eval.drift import DRIFT_LABELS
from core.eval.labels import (
    change_text,
    finite,
    interval_text,
    metric_label,
    probe_description,
    probe_title,
)
from core.fmt import value_text
from core.jobs.metrics import DoneRecord, of_kind
from core.jobs.registry import JobRegistry, jobs_by_run

if TYPE_CHECKING:  # annotations only: core.study.runs re-exports this module's names
    from core.study.runs import RunView


#: runs_table columns that are not a task's score
TABLE_FACTS = (
    "run",
    "label",
    "status",
    "method",
    "loss",
    "tau",
    "masked %",
    "target",
    "target Δ",
    "target Δ low",
    "target Δ high",
    "target Δ unit",
    "BWT",
    "BWT low",
    "BWT high",
    "TI",
    "TI low",
    "TI high",
    "prep s",
    "train s",
    "notes",
)

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
        jobs = jobs_by_run(JobRegistry().list())
    found = {run.run_id: jobs.get(run.run_id) for run in runs}
    return {
        run_id: run_status(run, getattr(found[run_id], "status", None))
        for run_id, run in zip(found, runs, strict=True)
    }


def _clean(value: Any) -> float | None:
    return float(value) if finite(value) else None


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
    """One row per run: method, token loss, τ (None where it does not apply), % masked, the
    target's change
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
            "loss": run.loss,
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
#: Title and help text of each fact column of `runs_display_table` (score columns get theirs
#: from `runs_columns`). The page's column_config and the report's header use both.
RUN_COLUMNS: dict[str, tuple[str, str]] = {
    "run": ("Run", "The run's id: the name of its folder under the runs root."),
    "label": (
        "Setup",
        "Method, τ where it applies, target share, the token loss when it is not nll, and seed "
        "(0 is not shown).",
    ),
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
    "loss": (
        "Token loss",
        "How each token the method keeps counts: nll (plain cross-entropy), soft_stm, dft, "
        "eaft, kl or asft (README, Token losses); combined with the method's mask.",
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
    return fmt.share(_clean(value) / 100 if finite(value) else None)


def _duration_cell(seconds: Any) -> str:
    return fmt.duration(float(seconds)) if finite(seconds) else fmt.MISSING


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
    for column in ("run", "label", "status", "method", "loss"):
        if column in table.columns:
            out[column] = [fmt.MISSING if v is None else str(v) for v in table[column]]
    methods = list(table["method"])
    out["tau"] = [_tau_cell(m, v) for m, v in zip(methods, table["tau"], strict=True)]
    out["masked %"] = [_masked_cell(m, v) for m, v in zip(methods, table["masked %"], strict=True)]
    out["target"] = [str(v) if isinstance(v, str) else fmt.MISSING for v in table["target"]]
    out["target Δ"] = [
        interval_text(d, lo, hi, u if isinstance(u, str) else "")
        for d, lo, hi, u in zip(
            table["target Δ"],
            table["target Δ low"],
            table["target Δ high"],
            table["target Δ unit"],
            strict=True,
        )
    ]
    for name in ("BWT", "TI"):
        out[f"{name} %"] = [
            interval_text(v, lo, hi, "%")
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
        return [
            f"{name}: only step {int(frame['step'].max())} evaluated so far; a change needs a "
            "later round."
        ]
    out = []
    change = final_target_change(run)
    if change is not None:
        text = change_text(
            change["delta"],
            change["low"],
            change["high"],
            unit=str(change["unit"]),
            higher_is_better=bool(change["accuracy"]),
            n=change["n"],
            reason=change["reason"],
        )
        out.append(
            f"{name}: target {change['task']} {change['metric']} at step "
            f"{int(change['step'])} vs step {int(change['base_step'])}: {text}."
        )
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
            text = change_text(
                value, low, high, unit="%", reason="too few items or no per-item scores"
            )
            out.append(f"{name}: {label} at step {summary.step}: {text}.")
    return out


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


def drift_display_table(table: pd.DataFrame) -> pd.DataFrame:
    """A `drift_table` as people read it: one row per run and probe, each metric under its
    readable name (`DRIFT_LABELS`) as "value [95% interval]", and the KL split toward / away
    from the base's answers with the share toward."""
    columns = [
        "run",
        "probe",
        "step",
        DRIFT_LABELS["kl"],
        DRIFT_LABELS["top1_agree"],
        DRIFT_LABELS["dnll"],
        SPLIT_COLUMN,
    ]
    if table.empty:
        return pd.DataFrame(columns=columns)
    out = []
    for (run, task), group in table.groupby(["run", "task"], sort=False):
        at = {str(r.metric): r for r in group.itertuples()}
        toward, away = at.get("kl_toward"), at.get("kl_away")
        split = fmt.MISSING
        if toward is not None and away is not None and finite(toward.value) and finite(away.value):
            total = float(toward.value) + float(away.value)
            share = f" ({100 * float(toward.value) / total:.0f}% toward)" if total > 0 else ""
            split = f"{float(toward.value):.3f} / {float(away.value):.3f}{share}"
        first = group.iloc[0]
        out.append(
            {
                "run": f"{first['label']} · {run}",
                "probe": f"{probe_title(str(task))} ({probe_description(str(task))})",
                "step": int(first["step"]),
                DRIFT_LABELS["kl"]: _cell(at, "kl"),
                DRIFT_LABELS["top1_agree"]: _cell(at, "top1_agree", percent=True),
                DRIFT_LABELS["dnll"]: _cell(at, "dnll", signed=True),
                SPLIT_COLUMN: split,
            }
        )
    return pd.DataFrame(out, columns=columns)


def _cell(at: dict[str, Any], metric: str, **kw: Any) -> str:
    """One `drift_table` metric of one run and probe as "value [interval]" ("–" if absent)."""
    row = at.get(metric)
    return fmt.MISSING if row is None else value_text(row.value, row.low, row.high, **kw)
