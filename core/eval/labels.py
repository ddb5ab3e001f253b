"""How evaluation results are named and written for a reader: each metric's readable name
(`metric_name`, `metric_label`), which metrics are shares or accuracies, the drift probes'
titles, and a change with its paired 95% interval and the verdict read off it (`change_text`).

One vocabulary for the run charts (core.viz), the runs tables and findings (core.study), the
pages and the report, so a chart's title and a table's header name a metric the same way.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

from core import fmt
from core.eval.drift import DRIFT_LABELS
from core.eval.suites import DRIFT, PRIMARY_METRIC
from core.stats import Interval

#: Readable names of the evaluation metrics, for pickers, chart titles, axes and tables (a
#: drift task's metrics: `DRIFT_LABELS`). One mapping: `metric_name` reads it.
METRIC_LABELS = {
    "acc": "accuracy",
    "acc_norm": "accuracy (length-normalised)",
    "exact_match": "exact match",
    "em": "exact match",
    "pass@1": "pass@1",
    "f1": "F1",
    "mc2": "MC2 accuracy",
    "bleu": "BLEU",
    "nll": "NLL per token",
    "ppl": "perplexity",
    "nll_easy": "NLL on base-easy tokens (diagnostic)",
    "ppl_easy": "perplexity on base-easy tokens (diagnostic)",
    "seq_ppl_mean": "mean sequence perplexity",
    "easy_share": "share of base-easy tokens",
}
#: Metrics that are shares of items or tokens: their axes run from 0 to 1.
UNIT_METRICS = frozenset(
    {"acc", "acc_norm", "exact_match", "em", "pass@1", "f1", "mc2", "easy_share", "top1_agree"}
)
#: Of those, the accuracies (higher is better; a multiple-choice task's chance level applies).
ACCURACY_METRICS = frozenset({"acc", "acc_norm", "exact_match", "em", "pass@1", "f1", "mc2"})
#: Accuracies that are a mean of right/wrong items: a raw value's 95% interval is the Wilson
#: score interval of that proportion over its n items.
BINARY_METRICS = frozenset({"acc", "acc_norm", "exact_match", "em", "pass@1"})


def metric_name(metric: str, task: str = "") -> str:
    """A metric key as a reader names it ("nll_easy" -> "NLL on base-easy tokens
    (diagnostic)"); a drift task's metric by `DRIFT_LABELS`; an unknown key with spaces."""
    if task and is_drift_task(task) and metric in DRIFT_LABELS:
        return DRIFT_LABELS[metric]
    return METRIC_LABELS.get(metric, metric.replace("_", " "))


DRIFT_METRIC = PRIMARY_METRIC[DRIFT]  # "kl": a drift task's primary metric (0 at the base)
OOD_DRIFT, TARGET_DRIFT, TEXT_DRIFT = "ood_drift", "target_drift", "text_drift"
#: What each built-in drift probe measures on, for titles and tables (a user's probe file,
#: "drift:NAME", is "prompts of NAME").
PROBE_TITLES = {
    OOD_DRIFT: "OOD drift",
    TARGET_DRIFT: "Target drift",
    TEXT_DRIFT: "Text drift",
}
PROBE_DESCRIPTIONS = {
    OOD_DRIFT: "mixed out-of-domain prompts",
    TARGET_DRIFT: "held-out prompts of the training task",
    TEXT_DRIFT: "LAMBADA text passages",
}


def is_drift_task(task: str) -> bool:
    """A built-in suite's drift probe, or a user's probe file ("drift:NAME")."""
    return task in PROBE_TITLES or task.startswith("drift:")


def probe_title(task: str) -> str:
    """A drift task's readable name: "OOD drift", "Target drift", "Text drift", or
    "Drift on NAME" for a user's probe file."""
    if task in PROBE_TITLES:
        return PROBE_TITLES[task]
    return f"Drift on {task.removeprefix('drift:')}"


def probe_noun(task: str) -> str:
    """`probe_title` inside a sentence ("no OOD drift measured", "no target drift ...")."""
    title = probe_title(task)
    return title if title.startswith("OOD") else title[0].lower() + title[1:]


def probe_description(task: str) -> str:
    """What a drift task's probe items are ("mixed out-of-domain prompts", ...)."""
    return PROBE_DESCRIPTIONS.get(task, f"prompts of {task.removeprefix('drift:')}")


def metric_label(task: str, metric: str, sep: str = " ") -> str:
    """A (task, metric) pair as a reader names it: a drift metric by its `DRIFT_LABELS` text
    under the probe's readable name, any other as "task{sep}readable metric" (`metric_name`)."""
    if metric in DRIFT_LABELS and is_drift_task(task):
        return f"{probe_title(task)}: {DRIFT_LABELS[metric]}"
    return f"{task}{sep}{metric_name(metric, task)}"


DIGITS = {"points": 1, "nats": 3, "%": 1}


def interval_text(
    estimate: Any, low: Any = None, high: Any = None, unit: str = "", digits: int | None = None
) -> str:
    """ "+5.0 [+1.2, +8.8] points", "+5.0 points (no interval)" or "–" (no estimate)."""
    digits = DIGITS.get(unit, 1) if digits is None else digits
    if not finite(estimate):
        return "–"
    unit = f" {unit}" if unit and unit != "%" else unit
    if finite(low) and finite(high):
        return f"{fmt.interval(float(estimate), float(low), float(high), digits)}{unit}"
    return f"{fmt.signed(float(estimate), digits)}{unit} (no interval)"


def change_text(
    estimate: Any,
    low: Any,
    high: Any,
    *,
    unit: str,
    higher_is_better: bool = True,
    n: Any = None,
    reason: Any = "",
) -> str:
    """One change with its paired 95% interval and the verdict read off it: "better" / "worse"
    only when the interval excludes zero, else "no detectable difference"; without an interval,
    the reason (e.g. "1 item: too few for an interval")."""
    interval = Interval(
        float(estimate) if finite(estimate) else None,
        float(low) if finite(low) else None,
        float(high) if finite(high) else None,
        int(n) if finite(n) else 0,
        reason=str(reason or "no interval"),
    )
    space = "" if unit == "%" else " "
    return interval.describe(f"{space}{unit}", DIGITS.get(unit, 1), higher_is_better)


def finite(value: Any) -> bool:
    """A real number (numpy's included) that is not NaN or infinite, and not a bool: a value a
    chart draws and a table writes as a number."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
