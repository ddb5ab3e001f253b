"""Tuned vs base: relative change, TI and BWT (docs/METHOD.md)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from core.errors import LensError
from core.eval.scorers import SuiteResult, TaskResult, chance_items, item_scores
from core.eval.suites import OOD, REF_PPL, TARGET, EvalSuite, EvalTaskSpec
from core.jobs.metrics import EvalSummaryRecord
from core.stats import mean_of_paired_interval, paired_interval

# --------------------------------------------------------------------------------------------
# TI / BWT
# --------------------------------------------------------------------------------------------


def relative_change(fine_tuned: float | None, original: float | None) -> float | None:
    """100 * (fine_tuned - original) / original; None when undefined (original 0 or missing)."""
    if fine_tuned is None or original is None or original == 0:
        return None
    return 100.0 * (fine_tuned - original) / original


@dataclass
class Comparison:
    """TI, BWT and per-task changes of a fine-tuned result against the base result.

    `notes` says why a number is missing (e.g. the base scored 0, so a relative change is
    undefined). `nll_easy_change` is the mean relative change (%) of the OOD reference tasks'
    NLL on base-easy tokens: positive means the model got worse at what it knew (forgetting).
    """

    ti: float | None
    bwt: float | None
    bwt_tasks: list[str]
    nll_easy_change: float | None
    per_task: dict[str, dict[str, Any]]
    notes: list[str] = field(default_factory=list)
    #: paired 95% intervals over items (`core.stats.Interval.to_dict()`), None where the
    #: results carry no per-item scores
    ti_interval: dict[str, Any] | None = None
    bwt_interval: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    def summary_record(self, step: int, when: float | None = None) -> dict[str, Any]:
        """The metrics.jsonl "eval_summary" record."""
        return EvalSummaryRecord(
            step=step,
            time=time.time() if when is None else when,
            bwt=self.bwt,
            ti=self.ti,
            nll_easy_change=self.nll_easy_change,
            notes=list(self.notes),
            **_bounds("bwt", self.bwt_interval),
            **_bounds("ti", self.ti_interval),
        ).to_dict()


def ti_spec(suite: EvalSuite) -> EvalTaskSpec | None:
    """The task TI is read from: the suite's first target accuracy task, else its target
    reference-NLL task (the full-token NLL, lower is better), else None."""
    accuracy = next((s for s in suite.target if s.is_accuracy), None)
    return accuracy or next((s for s in suite.target if s.scorer == REF_PPL), None)


def recorded_suite(result: SuiteResult) -> EvalSuite:
    """The suite `result` was scored on, as far as `compare_results` needs it: each task's name,
    scorer, role and primary metric, read from the result itself (a run folder's
    eval/step-N.json is compared without knowing the suite's settings of the day)."""
    specs = {
        role: tuple(
            EvalTaskSpec(t.name, t.task, t.scorer, n=None, metric=t.primary or "")
            for t in result.tasks
            if (t.role == TARGET) == (role == TARGET)
        )
        for role in (TARGET, OOD)
    }
    return EvalSuite(result.suite, "", target=specs[TARGET], ood=specs[OOD])


def compare_results(base: SuiteResult, tuned: SuiteResult, suite: EvalSuite) -> Comparison:
    """TI and BWT of `tuned` against `base` (same suite and settings), per docs/METHOD.md."""
    if base.settings_fingerprint != tuned.settings_fingerprint:
        raise LensError("Base and fine-tuned results come from different suite settings.")
    per_task: dict[str, dict[str, Any]] = {}
    items: dict[str, Any] = {}  # per task, its paired per-item scores (None without them)
    notes: list[str] = []
    for spec in suite.specs():
        b, t = base.task(spec.name), tuned.task(spec.name)
        if b is None or t is None:
            continue
        before, after = b.value, t.value
        metric = b.primary or t.primary
        items[spec.name] = paired_items(b, t, metric)
        per_task[spec.name] = {
            "role": suite.role(spec.name),
            "metric": metric,
            "base": before,
            "tuned": after,
            "delta": None if before is None or after is None else after - before,
            "relative_change": relative_change(after, before),
            **_paired_intervals(items[spec.name], accuracy=spec.is_accuracy),
            **_chance(b, metric),
        }
    ti = ti_interval = None
    target = ti_spec(suite)
    if target is not None and target.scorer == REF_PPL and target.name in per_task:
        # No affordable target accuracy: the target's own score is the full-token NLL of its
        # held-out references (never the easy-token NLL, which STM lowers by construction).
        row = per_task[target.name]
        if row["relative_change"] is not None:
            ti = -row["relative_change"]
            ti_interval = _negated(row.get("relative_interval"))
        notes.append(
            f"TI from {target.name} {row['metric']}: the full-token NLL of held-out "
            "references, lower is better, so TI = -(its relative change)."
        )
    elif target is None or target.scorer == REF_PPL:
        notes.append("TI: the suite has no target accuracy task.")
    elif target.name in per_task:
        ti = per_task[target.name]["relative_change"]
        ti_interval = per_task[target.name]["relative_interval"]
        if ti is None:
            notes.append(
                f"TI undefined: the base model scores {per_task[target.name]['base']} on "
                f"{target.name} {target.primary_metric}, so a relative change has no meaning."
            )
    bwt_tasks, excluded, unscored, at_chance = [], [], [], []
    changes = []
    for spec in suite.ood:
        if not spec.is_accuracy or spec.name not in per_task:
            continue
        change = per_task[spec.name]["relative_change"]
        if per_task[spec.name]["base"] is None or per_task[spec.name]["tuned"] is None:
            unscored.append(spec.name)
        elif per_task[spec.name].get("at_chance"):
            at_chance.append(spec.name)
        elif change is None:
            excluded.append(spec.name)
        else:
            bwt_tasks.append(spec.name)
            changes.append(change)
    if excluded:
        notes.append(
            "BWT leaves out " + ", ".join(excluded) + ": the base model scores 0 there, so the "
            "relative change is undefined (see the absolute deltas)."
        )
    if unscored:
        notes.append("BWT leaves out " + ", ".join(unscored) + ": not scored (skipped, see why).")
    for name in at_chance:
        row = per_task[name]
        notes.append(
            f"BWT leaves out {name}: the base model's {row['metric']} {row['base']:.3f} is within "
            f"its 95% interval of chance ({row['chance']:.3f}), so a change there says nothing "
            "about forgetting."
        )
    bwt = sum(changes) / len(changes) if changes else None
    bwt_interval = None
    if bwt_tasks and all(items[n] is not None for n in bwt_tasks):
        bwt_interval = mean_of_paired_interval([items[n] for n in bwt_tasks]).to_dict()
    if bwt is None:
        notes.append("BWT undefined: no OOD accuracy task with a non-zero base score above chance.")
    easy_changes = []
    for spec in suite.ood:
        if spec.scorer == REF_PPL:
            b, t = base.task(spec.name), tuned.task(spec.name)
            if b is not None and t is not None:
                change = relative_change(t.metrics.get("nll_easy"), b.metrics.get("nll_easy"))
                if change is not None:
                    easy_changes.append(change)
    nll_easy_change = sum(easy_changes) / len(easy_changes) if easy_changes else None
    return Comparison(
        ti=ti,
        bwt=bwt,
        bwt_tasks=bwt_tasks,
        nll_easy_change=nll_easy_change,
        per_task=per_task,
        notes=notes,
        ti_interval=ti_interval,
        bwt_interval=bwt_interval,
    )


def _chance(base: TaskResult, metric: str) -> dict[str, Any]:
    """The task's chance level (multiple choice: the mean of 1 / choices over its items) and
    whether the base score is within its paired 95% interval of it."""
    if metric not in ("acc", "acc_norm"):
        return {"chance": None, "at_chance": False}
    guess, scores = chance_items(base), item_scores(base, metric)
    if guess is None or scores is None:
        return {"chance": None, "at_chance": False}
    ids = [i for i in scores if i in guess]
    chance = sum(guess[i] for i in ids) / len(ids)
    above = paired_interval([guess[i] for i in ids], [scores[i][0] for i in ids])
    at_chance = above.low is None or not (above.low > 0)
    return {"chance": chance, "at_chance": at_chance}


def _negated(interval: dict[str, Any] | None) -> dict[str, Any] | None:
    """The interval of minus the change (a lower-is-better metric read as an improvement)."""
    if not interval:
        return interval
    flip = {"estimate": "estimate", "low": "high", "high": "low"}
    out = dict(interval)
    for key, source in flip.items():
        value = interval.get(source)
        out[key] = None if value is None else -value
    return out


def _bounds(name: str, interval: dict[str, Any] | None) -> dict[str, float | None]:
    """`<name>_low` / `<name>_high` of an interval dict (None without one)."""
    interval = interval or {}
    return {f"{name}_low": interval.get("low"), f"{name}_high": interval.get("high")}


def paired_items(
    base: TaskResult | None, tuned: TaskResult | None, metric: str
) -> tuple[list[tuple[float, float]], list[tuple[float, float]]] | None:
    """The (numerator, denominator) per item of `metric` on both sides, on the items both
    scored (in the base's order), or None without per-item scores."""
    if base is None or tuned is None:
        return None
    b, t = item_scores(base, metric), item_scores(tuned, metric)
    if b is None or t is None:
        return None
    common = [i for i in b if i in t]
    return [b[i] for i in common], [t[i] for i in common]


def _paired_intervals(items: Any, *, accuracy: bool) -> dict[str, Any]:
    """The task's absolute change (accuracy in points, NLL in nats) and relative change (%),
    each with its paired interval over `items` (from `paired_items`)."""
    if items is None:
        return {"delta_interval": None, "relative_interval": None}
    b, t = items
    scale = 100.0 if accuracy else 1.0
    return {
        "delta_interval": paired_interval(b, t, scale=scale).to_dict(),
        "relative_interval": paired_interval(b, t, relative=True).to_dict(),
    }
