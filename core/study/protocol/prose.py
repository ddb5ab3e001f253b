"""The protocol's results in words and tables: the headline (drift first, then benchmarks, the
target, caveats and the agreement of drift with ARC-Easy), the findings read off the intervals,
the summary table, the paired tables (each arm against ground truth, against STM), `results.md`
and the HTML report."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from core import fmt
from core.eval.drift import DRIFT_LABELS
from core.stats import Interval
from core.study.agreement import agreement_sentence
from core.study.protocol.config import FORGETTING, OOD_DRIFT, OOD_NLL


def paired_findings(paired: Sequence[dict[str, Any]]) -> list[str]:
    """One sentence per arm and task: the change against ground truth (or the base model) with
    its interval over seeds and items, "better" / "worse" only when the interval excludes
    zero."""
    lines = []
    for row in paired:
        unit = " points" if row["higher_is_better"] else " nats"
        interval = Interval(**row["interval"])
        digits = (3 if row["metric"] == "kl" else 2) if unit == " nats" else 1
        text = interval.describe(unit, digits=digits, higher_is_better=row["higher_is_better"])
        lines.append(
            f"{row['label']} vs {row.get('against', 'ground truth')}, {row['task']} "
            f"{metric_name(row['metric'], row.get('drift', False))} ({row['role']}, "
            f"{row['seeds']} seed(s) × {interval.n} items): {text}."
        )
    return lines


def metric_name(metric: str, drift: bool = False) -> str:
    """A paired row's metric as a reader names it (drift metrics by their label)."""
    return DRIFT_LABELS.get(metric, metric) if drift else metric


#: Short names of the drift metrics, in sentences and table columns.
DRIFT_SHORT = {"kl": "token KL", "top1_agree": "top-1 agreement", "dnll": "Δ NLL of its answers"}


#: The drift metrics as `paired_table`'s columns name them.
TABLE_DRIFT = {**DRIFT_SHORT, "dnll": "Δ NLL of the base's answers"}


def _digits(row: dict[str, Any]) -> int:
    """Decimals of a paired change: points (accuracies, top-1 agreement) 1, token KL 3, other
    nats 2."""
    if row["higher_is_better"]:
        return 1
    return 3 if row["metric"] == "kl" else 2


def paired_table(paired: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    """The paired rows as a table: one row per arm (in the order of `paired`), one column per
    task and metric ("ood_drift token KL, nats", "mbpp_ppl nll, nats (target)"), each cell the
    change against the reference with its 95% interval over seeds and items, followed by
    "better" / "worse" where the interval excludes zero (better for the arm: less drift, less
    forgetting, more gain), and the reference each row is against."""
    rows: dict[str, dict[str, str]] = {}
    for row in paired:
        unit = "points" if row["higher_is_better"] else "nats"
        name = TABLE_DRIFT.get(row["metric"], row["metric"]) if row.get("drift") else row["metric"]
        column = f"{row['task']} {name}, {unit}" + (" (target)" if row["role"] == "target" else "")
        interval = Interval(**row["interval"])
        cell = fmt.interval(interval.estimate, interval.low, interval.high, _digits(row))
        verdict = interval.verdict(row["higher_is_better"])
        if verdict in ("better", "worse"):
            cell += f" {verdict}"
        entry = rows.setdefault(
            row["arm"],
            {
                "arm": row["label"],
                "against": row.get("against", "ground truth"),
                "seeds": fmt.count(row["seeds"]),
            },
        )
        entry[column] = cell
    return list(rows.values())


def _verdict(row: dict[str, Any]) -> str:
    return Interval(**row["interval"]).verdict(row["higher_is_better"])


def _drift_sentence(rows: Sequence[dict[str, Any]]) -> str:
    """ "token KL +0.176 [+0.163, +0.189] nats, top-1 agreement -15.7 [...] points, ..." for
    the drift rows of one arm and task."""
    parts = []
    for row in rows:
        unit = " points" if row["higher_is_better"] else " nats"
        digits = (3 if row["metric"] == "kl" else 2) if unit == " nats" else 1
        interval = Interval(**row["interval"])
        if interval.estimate is None:
            continue
        text = f"{interval.estimate:+.{digits}f}"
        if interval.low is not None and interval.high is not None:
            text += f" [{interval.low:+.{digits}f}, {interval.high:+.{digits}f}]"
        parts.append(f"{DRIFT_SHORT.get(row['metric'], row['metric'])} {text}{unit}")
    return ", ".join(parts)


def _drift_headline(results: dict[str, Any]) -> list[str]:
    """The verdict on drift from the base model (the OOD probe; the sharper forgetting signal at
    CPU scale): how far ground truth drifted, and which arms drifted less or more than it."""
    base_rows = [
        r for r in results.get("paired_base") or [] if r.get("drift") and r["role"] == "ood"
    ]
    gt_rows = [
        r
        for r in [*(results.get("paired") or []), *(results.get("paired_random") or [])]
        if r.get("drift") and r["role"] == "ood"
    ]
    out = []
    for task in dict.fromkeys(r["task"] for r in base_rows if r["arm"] == "gt"):
        mine = [r for r in base_rows if r["arm"] == "gt" and r["task"] == task]
        seeds = mine[0]["seeds"]
        out.append(
            f"Drift ({task}, {seeds} seed(s)): ground-truth fine-tuning moved the model away from "
            f"the base model's own answers by {_drift_sentence(mine)} (95% intervals over seeds "
            "and probe items)."
        )
    groups = dict.fromkeys((r["arm"], r["against"], r["task"]) for r in gt_rows)
    for arm, against, task in groups:
        rows = [r for r in gt_rows if (r["arm"], r["against"], r["task"]) == (arm, against, task)]
        kl = next((r for r in rows if r["metric"] == "kl"), None)
        if kl is not None:
            verdict = _verdict(kl)
            word = {
                "better": f"drifted less than {against}",
                "worse": f"drifted more than {against}",
            }.get(verdict, f"showed no detectable difference in drift from {against}")
            sharpened = next((r for r in rows if r["metric"] == "dnll"), None)
            tail = ""
            if sharpened is not None and _verdict(sharpened) == "better":
                tail = (
                    f" It kept the base model's own answers more likely than {against} did, "
                    "so part of its remaining KL is sharpening toward them, not moving away."
                )
            out.append(
                f"{rows[0]['label']} {word} on {task} (vs {against}: "
                f"{_drift_sentence(rows)}).{tail}"
            )
    return out


def short_headline(results: dict[str, Any]) -> list[str]:
    """The headline for a summary (the Start page): drift on the out-of-domain probe only, the
    benchmarks, the target, caveats and the agreement; the other probes' sentences stay on the
    Reproduce page and in the report."""
    other = ("text_drift", "target_drift")
    return [line for line in headline(results) if not any(p in line for p in other)]


def _small_arm_notes(results: dict[str, Any]) -> list[str]:
    """A caveat for each arm that trained on under a quarter of ground truth's examples (e.g.
    Self-Output when few problems have a verified answer): little training, little forgetting."""
    arms = results.get("arms") or {}

    def examples(key: str) -> float | None:
        stat = (arms.get(key) or {}).get("measures", {}).get("train examples") or {}
        return stat.get("mean")

    gt = examples("gt")
    out = []
    for key, arm in arms.items():
        mine = examples(key)
        if key != "gt" and gt and mine is not None and mine < gt / 4:
            out.append(
                f"{arm['label']} trained on {mine:.0f} examples against ground truth's "
                f"{gt:.0f}: its small drift and kept accuracy say little about the method."
            )
    return out


def _target_headline(results: dict[str, Any]) -> list[str]:
    """The gain side, per target task: each arm's change against the base model ("learned the
    target" or "lost ground on it" only where the interval excludes zero), so that less
    forgetting bought by learning less reads as such."""
    rows = [
        r for r in results.get("paired_base") or [] if r["role"] == "target" and not r.get("drift")
    ]
    out = []
    for task in dict.fromkeys(r["task"] for r in rows):
        parts = []
        for row in (r for r in rows if r["task"] == task):
            words = {"better": "better", "worse": "worse"}.get(
                _verdict(row), "no detectable change"
            )
            parts.append(f"{row['label']} {_drift_sentence([row]).split(' ', 1)[-1]} ({words})")
        metric = metric_name(rows[0]["metric"])
        out.append(f"Target ({task} {metric}, against the base model): " + "; ".join(parts) + ".")
    return out


def headline(results: dict[str, Any]) -> list[str]:
    """What a stakeholder reads first, from the paired intervals (over seeds and items): how far
    each arm drifted from the base model (the verdict), then the benchmark view: did ground truth
    forget out of domain, and did each other arm forget less than it."""
    drift = _drift_headline(results)
    base_rows = [
        r for r in results.get("paired_base") or [] if r["role"] == "ood" and not r.get("drift")
    ]
    if not base_rows and not drift:
        return ["No per-item results yet: nothing can be said with an interval."]
    out = list(drift)
    gt = [r for r in base_rows if r["arm"] == "gt"]
    if gt:
        worse = [f"{r['task']} {r['metric']}" for r in gt if _verdict(r) == "worse"]
        better = [f"{r['task']} {r['metric']}" for r in gt if _verdict(r) == "better"]
        if worse:
            out.append(
                "Benchmarks: ground-truth fine-tuning made the model detectably worse out of "
                "domain on " + ", ".join(worse) + " (95% interval over items and seeds excludes "
                "zero): there is forgetting to prevent."
            )
        else:
            out.append(
                "Benchmarks: ground-truth fine-tuning caused no detectable out-of-domain loss on "
                f"the benchmark tasks here (no interval excludes a loss; {len(gt)} tasks), so "
                "on benchmarks no arm can be shown to forget less in this setting."
            )
        if better:
            out.append("It improved " + ", ".join(better) + ".")
    paired = [r for r in results.get("paired") or [] if not r.get("drift")]
    for arm in dict.fromkeys(r["arm"] for r in paired):
        rows = [r for r in paired if r["arm"] == arm and r["role"] == "ood"]
        if not rows:
            continue
        label = rows[0]["label"]
        less = [f"{r['task']} {r['metric']}" for r in rows if _verdict(r) == "better"]
        more = [f"{r['task']} {r['metric']}" for r in rows if _verdict(r) == "worse"]
        parts = []
        if less:
            parts.append("forgot less than ground truth on " + ", ".join(less))
        if more:
            parts.append("forgot more than ground truth on " + ", ".join(more))
        same = len(rows) - len(less) - len(more)
        if same:
            parts.append(f"no detectable difference from ground truth on {same} benchmark task(s)")
        out.append(f"{label}: " + "; ".join(parts) + ".")
    out += _target_headline(results)
    out += _small_arm_notes(results)
    agreement = results.get("agreement")
    if agreement and len(agreement.get("runs", [])) >= 4:
        out.append(agreement_sentence(agreement))
    return out


def _interval(stat: dict[str, Any]) -> tuple[float, float] | None:
    if stat.get("mean") is None:
        return None
    half = stat.get("ci95") or 0.0
    return stat["mean"] - half, stat["mean"] + half


def compare_to_gt(arm: dict[str, Any], gt: dict[str, Any], measure: str) -> str | None:
    """'lower' / 'higher' when the arm's 95% CI lies wholly below / above ground truth's,
    'overlap' when they overlap, None when either is missing or has a single seed."""
    a, g = arm["measures"].get(measure, {}), gt["measures"].get(measure, {})
    if not a or not g or a.get("ci95") is None or g.get("ci95") is None:
        return None
    ia, ig = _interval(a), _interval(g)
    if ia is None or ig is None:
        return None
    if ia[1] < ig[0]:
        return "lower"
    if ia[0] > ig[1]:
        return "higher"
    return "overlap"


def findings(results: dict[str, Any]) -> list[str]:
    """One sentence per arm on what the paper predicts (less out-of-domain forgetting than
    ground truth), read off the 95% CIs; the paper's claim is not assumed."""
    arms = results["arms"]
    gt = arms.get("gt")
    out: list[str] = []
    if gt is None:
        return ["No ground-truth arm: nothing to compare against."]
    if all(len(arm["seeds"]) < 2 for arm in arms.values()):
        return [
            "One seed per arm: no spread over seeds to compare here; the paired comparisons "
            "over the evaluation items carry the verdicts."
        ]
    target = next((m for m in gt["measures"] if m.startswith("target:") and "nll:Δ%" in m), None)
    for key, arm in arms.items():
        if key == "gt":
            continue
        for measure, what, better in (
            (FORGETTING, "out-of-domain NLL on base-easy tokens (forgetting)", "lower"),
            (OOD_NLL, "out-of-domain NLL on all tokens", "lower"),
            ("BWT", "BWT", "higher"),
            (target, "target reference NLL", "lower"),
        ):
            if measure is None:
                continue
            verdict = compare_to_gt(arm, gt, measure)
            a = arm["measures"].get(measure, {}).get("mean")
            g = gt["measures"].get(measure, {}).get("mean")
            if verdict is None or a is None or g is None:
                continue
            if verdict == "overlap":
                word = "indistinguishable from ground truth (95% CIs overlap)"
            else:
                word = (
                    f"{'better' if verdict == better else 'worse'} than ground truth "
                    "(95% CIs apart)"
                )
            out.append(f"{arm['label']}: {what} {a:+.2f} vs {g:+.2f}: {word}.")
    return out


def _fmt_stat(stat: dict[str, Any] | None, digits: int = 2) -> str:
    if not stat or stat.get("mean") is None:
        return "-"
    text = f"{stat['mean']:+.{digits}f}" if digits else f"{stat['mean']:.0f}"
    if stat.get("ci95") is not None:
        text += f" ± {stat['ci95']:.{digits}f}"
    return text


def measure_label(measure: str) -> str:
    """Column title of a measure: "mbpp_ppl nll Δ% (target)", "OOD easy-token NLL Δ%", ..."""
    if measure == FORGETTING:
        return "OOD easy-token NLL Δ%"
    if measure == OOD_NLL:
        return "OOD NLL Δ%"
    if measure == OOD_DRIFT:
        return "OOD drift (token KL)"
    parts = measure.split(":")
    if len(parts) >= 3 and parts[0] in ("target", "ood"):
        text = " ".join(parts[1:]).replace(" Δ%", " Δ%")
        return f"{text} (target)" if parts[0] == "target" else text
    return measure


def probe_items(results: dict[str, Any], task: str = "ood_drift") -> int | None:
    """How many items of the drift probe `task` the runs were compared on (the paired rows'
    n), or None when the results hold no paired row of it."""
    for row in results.get("paired_base") or []:
        if row.get("task") == task and isinstance(row.get("interval"), dict):
            return row["interval"].get("n")
    return None


def summary_table(results: dict[str, Any], detail: bool = False) -> list[dict[str, str]]:
    """Rows of the protocol table: one per arm, mean ± 95% CI half-width over seeds.

    The summary has the masked share, each target change, the two out-of-domain NLL signals,
    BWT, TI and the final training loss; `detail` has the change of every task and metric."""
    measures: list[str] = []
    for arm in results["arms"].values():
        for m in arm["measures"]:
            if m not in measures:
                measures.append(m)

    def order(m: str) -> tuple[int, str]:
        head = ("masked %", "target:", FORGETTING, OOD_NLL, "BWT", "TI", "ood:")
        return next((i for i, h in enumerate(head) if m.startswith(h)), len(head)), m

    if detail:
        shown = [m for m in sorted(measures, key=order) if ":" in m and m.endswith("Δ%")]
    else:
        changes = [m for m in sorted(measures, key=order) if m.startswith("target:")]
        changes = [m for m in changes if m.endswith("Δ%")]
        shown = ["masked %", *changes, OOD_DRIFT, FORGETTING, OOD_NLL, "BWT", "TI", "final loss"]
        # a suite without drift (or without OOD reference NLLs) has no such column
        measured = {
            m
            for arm in results["arms"].values()
            for m, stat in arm["measures"].items()
            if (stat or {}).get("mean") is not None
        }
        optional = (OOD_DRIFT, FORGETTING, OOD_NLL)
        shown = [m for m in shown if m not in optional or m in measured]
    rows = []
    for arm in results["arms"].values():
        row = {"arm": arm["label"], "seeds": str(len(arm["seeds"]))}
        for m in shown:
            stat = arm["measures"].get(m)
            text = _fmt_stat(stat, 3 if m in ("final loss", OOD_DRIFT) else 2)
            plain = m in ("masked %", "final loss", OOD_DRIFT)
            row[measure_label(m)] = text.lstrip("+") if plain else text
        if arm["failed"]:
            row["seeds"] += f" ({len(arm['failed'])} failed)"
        rows.append(row)
    return rows


def markdown_table(rows: list[dict[str, str]]) -> list[str]:
    if not rows:
        return []
    head = list(rows[0])
    for row in rows[1:]:
        head += [k for k in row if k not in head]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return lines + ["| " + " | ".join(row.get(k, "-") for k in head) + " |" for row in rows]


def _paired_markdown(paired: Sequence[dict[str, Any]]) -> list[str]:
    """`paired_table` in Markdown, under a line saying how to read it (nothing when empty)."""
    rows = paired_table(paired)
    if not rows:
        return []
    return [
        "",
        "As a table (change against the reference, 95% interval over seeds and items; "
        '"better" / "worse" for the arm, only where the interval excludes zero):',
        "",
        *markdown_table(rows),
    ]


def results_markdown(results: dict[str, Any]) -> str:
    """The protocol's table, findings and notes as Markdown."""
    rows = summary_table(results)
    cfg = results["config"]
    lines = [
        f"# Protocol results ({cfg['preset']} preset, {cfg['task']} target, "
        f"{len(cfg['seeds'])} seed(s))",
        "",
        "Mean ± 95% CI half-width over seeds (Student t). Δ% is the relative change from the "
        "step-0 (base model) evaluation to the end of training. OOD easy-token NLL Δ%: mean "
        "change of the out-of-domain reference NLL on the tokens the base model found easy; "
        "OOD NLL Δ%: the same on all tokens (> 0: the model got worse there, i.e. forgot). The "
        "± here is the spread over training seeds only (none with one seed): the evaluation "
        "items are fixed, so ± 0.00 means every seed gave the same score, not that the score "
        "is exact. The paired sections below add the items' sampling error.",
        "",
    ]
    lines += markdown_table(rows)
    lines += ["", "Change (%) of every task and metric:", ""]
    lines += markdown_table(summary_table(results, detail=True))
    lines += ["", "## Findings", ""]
    lines += [f"- {f}" for f in results["findings"]] or ["- (none)"]
    lines += ["", "## In short", ""] + [f"- {h}" for h in headline(results)]
    lines += ["", "## Each arm against the base model, paired over seeds and items", ""]
    lines += [
        "The end of training against the same run's step-0 round (the base model) on the same "
        "items: out-of-domain tasks show the forgetting, the target the gain.",
        "",
    ]
    lines += [f"- {f}" for f in results.get("paired_base_findings") or []] or [
        "- (no per-item results: runs made before they were kept)"
    ]
    paired = results.get("paired_findings") or []
    lines += ["", "## Each arm against ground truth, paired over seeds and items", ""]
    lines += [
        "Hierarchical bootstrap (seeds, then the same evaluation items on both sides), 95%. "
        '"Better" / "worse" only where the interval excludes zero; otherwise the change '
        "this design could detect is given.",
        "",
    ]
    lines += [f"- {f}" for f in paired] or [
        "- (no per-item results: runs made before they were kept)"
    ]
    lines += _paired_markdown(results.get("paired") or [])
    if results.get("paired_stm"):
        lines += ["", "## Each arm against STM, paired over seeds and items", ""]
        lines += [
            "The same comparison with STM at τ as the reference: whether a token loss (or STM "
            "combined with one) forgets less or learns more than the mask it competes with.",
            "",
        ]
        lines += [f"- {f}" for f in results.get("paired_stm_findings") or []]
        lines += _paired_markdown(results["paired_stm"])
    if results.get("paired_random_findings"):
        lines += ["", "## STM against the random control (as many tokens masked at random)", ""]
        lines += [f"- {f}" for f in results["paired_random_findings"]]
    if results.get("agreement"):
        lines += ["", "## Drift against ARC-Easy, run by run", ""]
        lines += [f"- {agreement_sentence(results['agreement'])}"]
    if results["notes"]:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    failed = [r for r in results["runs"] if r["status"] != "succeeded"]
    if failed:
        lines += ["", "## Failed runs", ""]
        lines += [f"- {r['run']}: {r.get('error', '')}" for r in failed]
    span = results.get("span_s")
    lines += [""]
    if span is not None:
        lines.append(f"Time from the first run's start to the last run's end: {span / 60:.1f} min.")
    lines.append(f"Wall time of the call that wrote this: {results['wall_time_s'] / 60:.1f} min.")
    return "\n".join(lines) + "\n"


#: The paired tables the report and the Reproduce page show: (results key, heading).
PAIRED_TABLES = (
    ("paired", "Each arm against ground truth, paired over seeds and items"),
    ("paired_stm", "Each arm against STM, paired over seeds and items"),
)


def write_protocol_report(results: dict[str, Any], run_ids: Sequence[str], out: Path) -> Path:
    """The report of all the protocol's runs, opened by its summary table and findings."""
    from core.study.report import write_report  # lazy: heavy (torch, through diagnostics)

    intro = " ".join(headline(results))
    intro += " Protocol summary: mean ± 95% CI over seeds. " + " ".join(results["findings"])
    if results.get("paired_base_findings"):
        intro += " Against the base model: " + " ".join(results["paired_base_findings"])
    if results.get("paired_findings"):
        intro += " Paired over seeds and items: " + " ".join(results["paired_findings"])
    if results.get("paired_stm_findings"):
        intro += " Against STM: " + " ".join(results["paired_stm_findings"])
    tables = [
        ("Protocol summary", pd.DataFrame(summary_table(results))),
        ("Change (%) of every task and metric", pd.DataFrame(summary_table(results, True))),
    ]
    for key, heading in PAIRED_TABLES:
        rows = paired_table(results.get(key) or [])
        if rows:
            tables.append((heading, pd.DataFrame(rows)))
    return write_report(
        run_ids,
        out,
        title="Perplexity Lens: paper protocol",
        notes=intro,
        tables=tables,
    )
