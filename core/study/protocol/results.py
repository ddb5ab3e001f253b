"""The protocol's numbers: what each run measured (`run_measures`), the mean and 95% interval of
each measure per arm over seeds (`aggregate`), and the paired comparisons over seeds and then
the same evaluation items: each arm against its own step 0, against ground truth, against STM
(the token-loss arms: does a loss beat the mask it competes with), and the STM arms against the
random control."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.eval.compare import paired_items, relative_change
from core.eval.scorers import SuiteResult
from core.eval.suites import DRIFT
from core.io import read_json
from core.jobs.metrics import EvalSummaryRecord, latest
from core.jobs.runfiles import eval_round_path, eval_round_steps
from core.stats import hierarchical_interval, mean_ci
from core.study.agreement import drift_agreement
from core.study.protocol.config import FORGETTING, OOD_NLL, ProtocolConfig
from core.study.protocol.prose import findings, paired_findings
from core.study.runs import load_run, resolve_run_dir


def run_measures(run: Any) -> dict[str, float | None]:
    """What the protocol compares for one run (a `core.study.runs.RunView`): relative changes (%)
    from its step-0 (base) evaluation to its last one, plus BWT, TI and training facts."""
    frame = run.eval_frame()
    out: dict[str, float | None] = {}
    if not frame.empty:
        base, tuned = run.scores_at("base"), run.scores_at("last")
        roles = run.roles()
        for (task, metric), value in tuned.items():
            role = roles.get(task, "ood")
            if metric in ("kl", "top1_agree") and task.endswith("_drift"):
                out[f"{role}:{task}:{metric}"] = value  # 0 / 1 at the base: no relative change
                continue
            keep = metric in ("acc", "pass@1", "exact_match") or (
                metric in ("nll", "nll_easy") and task.endswith("_ppl")
            )
            if not keep:
                continue
            out[f"{role}:{task}:{metric}"] = value
            out[f"{role}:{task}:{metric}:Δ%"] = relative_change(value, base.get((task, metric)))
    last_summary = latest(run.records, EvalSummaryRecord) or EvalSummaryRecord()
    out["BWT"] = last_summary.bwt
    out["TI"] = last_summary.ti
    out[FORGETTING] = last_summary.nll_easy_change
    ood_nll = [v for k, v in out.items() if k.startswith("ood:") and k.endswith(":nll:Δ%")]
    ood_nll = [v for v in ood_nll if v is not None]
    out[OOD_NLL] = sum(ood_nll) / len(ood_nll) if ood_nll else None
    out["masked %"] = None if run.masked_share is None else 100 * run.masked_share
    data = run.data_record
    out["train examples"] = data.get("n_examples")
    out["final loss"] = run.summary.get("train_loss_last")
    out["train s"] = run.train_seconds
    return out


def aggregate(
    config: ProtocolConfig,
    runs: Sequence[dict[str, Any]],
    notes: Sequence[str],
    seconds: float,
    spans: Sequence[tuple[float, float]] = (),
    *,
    paired: bool = True,
) -> dict[str, Any]:
    """Per-arm means and 95% CIs over seeds, and the per-run measures behind them (`paired`:
    also the paired comparisons over seeds and items, the slow part).

    `seconds` is this call's wall time; `span_s` in the result is the time from the first
    start to the last end of the runs (and `spans`, e.g. the generation), whichever call of a
    resumed protocol made them."""
    per_run = []
    spans = list(spans)
    for entry in runs:
        if entry["status"] != "succeeded":
            per_run.append({**entry, "measures": {}})
            continue
        view = load_run(entry["run"])
        per_run.append({**entry, "measures": run_measures(view)})
        end, wall = view.summary.get("finished"), view.summary.get("wall_time_s")
        if end is not None and wall is not None:
            spans.append((float(end) - float(wall), float(end)))
    arms: dict[str, Any] = {}
    for key in config.methods:
        rows = [r for r in per_run if r["arm"] == key and r["measures"]]
        failed = [r for r in per_run if r["arm"] == key and r["status"] != "succeeded"]
        if not rows and not failed:
            continue
        names = sorted({m for r in rows for m in r["measures"]})
        arms[key] = {
            "label": next(r["label"] for r in [*rows, *failed]),
            "seeds": [r["seed"] for r in rows],
            "failed": [{"seed": r["seed"], "error": r.get("error", "")} for r in failed],
            "measures": {m: mean_ci([r["measures"].get(m) for r in rows]) for m in names},
        }
    results = {
        "config": config.to_dict(),
        "arms": arms,
        "runs": per_run,
        "notes": list(notes),
        "wall_time_s": seconds,
        "span_s": max(e for _, e in spans) - min(b for b, _ in spans) if spans else None,
        "finished": time.time(),
    }
    results["findings"] = findings(results)
    if not paired:
        return results
    results["paired"] = paired_with_gt(config, per_run)
    results["paired_findings"] = paired_findings(results["paired"])
    results["paired_base"] = paired_with_base(config, per_run)
    results["paired_base_findings"] = paired_findings(results["paired_base"])
    results["paired_random"] = paired_with_random(config, per_run)
    results["paired_random_findings"] = paired_findings(results["paired_random"])
    results["paired_stm"] = paired_with_stm(config, per_run)
    results["paired_stm_findings"] = paired_findings(results["paired_stm"])
    results["agreement"] = drift_agreement(per_run)
    return results


#: Task metrics compared item by item: accuracies (higher is better), the full-token reference
#: NLL (lower is better; not the easy-token NLL, which STM lowers by construction), and drift from
#: the base model (core/eval/drift.py): token KL (lower is less drift), top-1 agreement with the
#: base (higher is less drift) and the change in NLL of the base's own answers (lower: the model
#: kept or sharpened the base's behaviour).
PAIRED_METRICS = {
    "acc": True,
    "pass@1": True,
    "exact_match": True,
    "nll": False,
    "kl": False,
    "top1_agree": True,
    "dnll": False,
}


#: The drift metrics each drift task is compared on, in the order findings list them.
DRIFT_PAIRED = ("kl", "top1_agree", "dnll")


def _round(run_dir: Path, which: str = "last") -> Any | None:
    """The first (step 0: the base model) or last evaluation round's full result of a run
    (None for runs without per-item results: made before they were kept, or never evaluated)."""
    steps = eval_round_steps(run_dir)
    if not steps or (which == "first" and len(steps) < 2):
        return None
    data = read_json(eval_round_path(run_dir, steps[0] if which == "first" else steps[-1]))
    return SuiteResult.from_dict(data) if isinstance(data, dict) else None


def _rounds(per_run: Sequence[dict[str, Any]], which: str) -> dict[tuple[str, int], Any]:
    """(arm, seed) -> that run's first or last evaluation round, for the runs that finished."""
    out: dict[tuple[str, int], Any] = {}
    for entry in per_run:
        if entry["status"] == "succeeded":
            result = _round(resolve_run_dir(entry["run"]), which)
            if result is not None:
                out[(entry["arm"], int(entry["seed"]))] = result
    return out


def _paired_rows(
    arm: str,
    label: str,
    against: str,
    reference: dict[int, Any],
    results: dict[int, Any],
) -> list[dict[str, Any]]:
    """Task by task, `results` (seed -> SuiteResult) against `reference` on the same items: a
    hierarchical bootstrap over the seeds both have, then items paired by id."""
    seeds = sorted(s for s in results if s in reference)
    if not seeds:
        return []
    rows = []
    for task in reference[seeds[0]].tasks:
        if task.scorer == DRIFT:
            metrics: tuple[str, ...] = DRIFT_PAIRED
        else:
            metrics = ("nll" if task.scorer == "ref_ppl" else task.primary,)
        for metric in metrics:
            if metric not in PAIRED_METRICS:
                continue
            pairs = [
                paired_items(reference[s].task(task.name), results[s].task(task.name), metric)
                for s in seeds
            ]
            if any(p is None or not p[0] for p in pairs):
                continue
            higher = PAIRED_METRICS[metric]
            interval = hierarchical_interval(
                [p[0] for p in pairs], [p[1] for p in pairs], scale=100.0 if higher else 1.0
            )
            rows.append(
                {
                    "arm": arm,
                    "label": label,
                    "against": against,
                    "task": task.name,
                    "role": task.role,
                    "metric": metric,
                    "drift": task.scorer == DRIFT,
                    "seeds": len(seeds),
                    "higher_is_better": higher,
                    "interval": interval.to_dict(),
                }
            )
    return rows


def _labels(per_run: Sequence[dict[str, Any]]) -> dict[str, str]:
    return {entry["arm"]: entry["label"] for entry in per_run}


def paired_with_gt(
    config: ProtocolConfig, per_run: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Each arm against ground truth at the end of training, task by task, on the same items:
    a hierarchical bootstrap over seeds (arm seed s paired with ground-truth seed s) and then
    items (paired by id). Accuracies in points, the reference NLL in nats."""
    finals, labels = _rounds(per_run, "last"), _labels(per_run)
    gt = {s: r for (a, s), r in finals.items() if a == "gt"}
    out: list[dict[str, Any]] = []
    for arm in config.methods:
        if arm != "gt":
            mine = {s: r for (a, s), r in finals.items() if a == arm}
            out += _paired_rows(arm, labels.get(arm, arm), "ground truth", gt, mine)
    return out


def paired_with_random(
    config: ProtocolConfig, per_run: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The STM arms against the random control (as many tokens masked, at random) at the end of
    training, seed by seed then item by item: whether *which* tokens STM masks matters, beyond
    how many. Empty when the protocol has no random arm."""
    finals, labels = _rounds(per_run, "last"), _labels(per_run)
    control = {s: r for (a, s), r in finals.items() if a == "random"}
    out: list[dict[str, Any]] = []
    if not control:
        return out
    for arm in config.methods:
        if arm in ("stm", "stm_share"):
            mine = {s: r for (a, s), r in finals.items() if a == arm}
            out += _paired_rows(arm, labels.get(arm, arm), "the random control", control, mine)
    return out


#: Arms not compared with STM: STM itself, and ground truth and the random control, whose
#: comparisons with STM are the STM rows of `paired_with_gt` and `paired_with_random`.
NOT_AGAINST_STM = ("stm", "gt", "random")


def paired_with_stm(
    config: ProtocolConfig, per_run: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Each other arm (the token losses, STM with KL, STM at a share, Self-Output) against STM at
    τ at the end of training, seed by seed then item by item, as `paired_with_gt` does against
    ground truth: whether a loss forgets less or learns more than the mask. Empty when the
    protocol has no STM arm."""
    finals, labels = _rounds(per_run, "last"), _labels(per_run)
    stm = {s: r for (a, s), r in finals.items() if a == "stm"}
    out: list[dict[str, Any]] = []
    if not stm:
        return out
    against = labels.get("stm", "STM")
    for arm in config.methods:
        if arm not in NOT_AGAINST_STM:
            mine = {s: r for (a, s), r in finals.items() if a == arm}
            out += _paired_rows(arm, labels.get(arm, arm), against, stm, mine)
    return out


def paired_with_base(
    config: ProtocolConfig, per_run: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Each arm at the end of training against the base model (its own step-0 round), task by
    task on the same items, over seeds then items: the forgetting (OOD) and the gain (target)
    each arm causes."""
    firsts, finals, labels = _rounds(per_run, "first"), _rounds(per_run, "last"), _labels(per_run)
    out: list[dict[str, Any]] = []
    for arm in config.methods:
        base = {s: r for (a, s), r in firsts.items() if a == arm}
        mine = {s: r for (a, s), r in finals.items() if a == arm}
        out += _paired_rows(arm, labels.get(arm, arm), "the base model", base, mine)
    return out
