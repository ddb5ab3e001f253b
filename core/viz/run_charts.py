"""Plotly builders for training runs (pure: RunView / tables in, `go.Figure` out).

Each method keeps one colour everywhere (`METHOD_COLORS`); several runs of one method (seeds)
share the colour and differ in dash. Used by the Runs and Compare pages and by the HTML report.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pandas as pd
import plotly.graph_objects as go

from core import fmt
from core.eval.drift import DRIFT_LABELS
from core.eval.suites import DRIFT, PRIMARY_METRIC
from core.fmt import value_text
from core.jobs.metrics import (
    EvalSummaryRecord,
    StartRecord,
    as_records,
    latest,
    loss_by_step,
    of_kind,
)
from core.masking import DEFAULT_TAU
from core.stats import Interval
from core.viz.charts import FALLBACK_COLORS, _base_layout

if TYPE_CHECKING:  # only for annotations: core.viz sits below core.study
    from core.study.runs import RunView

METHOD_COLORS: dict[str, str] = {
    "base": "#6b7280",
    "gt": "#D55E00",
    "stm": "#0072B2",
    "random": "#E69F00",
    "low": "#CC79A7",
    "percentile": "#56B4E9",
    "self_output": "#009E73",
    "rephrase": "#7F3C8D",
}
DASHES = ("solid", "dash", "dot", "dashdot", "longdash")


def method_color(method: str) -> str:
    """Colour of a training method, the same in every chart."""
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    return FALLBACK_COLORS[sum(map(ord, method)) % len(FALLBACK_COLORS)]


def _styles(runs: Sequence[RunView]) -> dict[str, dict[str, str]]:
    seen: dict[str, int] = {}
    styles = {}
    for run in runs:
        k = seen.get(run.method, 0)
        seen[run.method] = k + 1
        styles[run.run_id] = {"color": method_color(run.method), "dash": DASHES[k % len(DASHES)]}
    return styles


def figure_notes(fig: go.Figure) -> list[str]:
    """The sentences a chart builder attached to its figure (`layout.meta["notes"]`): what the
    chart cannot show (no rounds yet, no interval, a run left out) and each run's last change
    with its interval. Pages show them as a caption under the chart, the report as a note."""
    meta = fig.layout.meta
    return list(meta.get("notes", [])) if isinstance(meta, dict) else []


def _finish(fig: go.Figure, notes: Sequence[str], empty: str = "") -> go.Figure:
    """Attach `notes`; with no data trace, say `empty` in the middle of the plot."""
    fig.update_layout(meta={"notes": list(notes)})
    if empty and not any(t.meta and t.meta.get("role") == "line" for t in fig.data):
        fig.layout.shapes = ()  # zero lines on an empty plot point at nothing
        fig.add_annotation(
            text=empty, xref="paper", yref="paper", x=0.5, y=0.5, showarrow=False,
            font={"color": "#6b7280", "size": 13},
        )  # fmt: skip
        fig.update_xaxes(showticklabels=False)
        fig.update_yaxes(showticklabels=False)
    return fig


PANEL_PLOT_PX = 250  # the plot area's height in a panel, whatever the legend takes below it


def _panel_layout(
    fig: go.Figure, title: str, x_title: str, y_title: str, better: str = ""
) -> go.Figure:
    """`_base_layout` for a chart a third of the page wide: the legend below the plot (one row
    per run, so it never covers the title), the figure as tall as the legend needs, and which
    way is better on a second line of the y-axis title."""
    _base_layout(fig, title, x_title, f"{y_title}<br>({better} is better)" if better else y_title)
    rows = sum(1 for t in fig.data if t.showlegend is not False)
    bottom = 64 + 22 * rows
    fig.update_layout(
        height=48 + PANEL_PLOT_PX + bottom,
        legend={"orientation": "h", "yref": "container", "yanchor": "bottom", "y": 0.0,
                "x": 0.0, "xanchor": "left", "font": {"size": 12}},
        margin={"l": 78, "r": 16, "t": 48, "b": bottom},
        title={"font": {"size": 15}},
    )  # fmt: skip
    fig.update_yaxes(title_font={"size": 12})
    fig.update_xaxes(title_font={"size": 12})
    fit_step_axis(fig)
    fig.update_layout(showlegend=rows > 0)  # also with one run: every panel lines up
    return fig


def fit_step_axis(fig: go.Figure) -> None:
    """An x axis of training steps fitted to the steps drawn: whole steps only (a tick per step
    over up to 10 steps), and a single round's axis half a step either side of it (plotly's own
    would run from step -1 to 1)."""
    steps = [float(x) for t in fig.data if t.x is not None for x in t.x if _finite(x)]
    if not steps or not all(x.is_integer() for x in steps):
        return
    lo, hi = min(steps), max(steps)
    if hi - lo <= 10:  # a few steps: no ticks between them
        fig.update_xaxes(dtick=1, range=[lo - 0.5, hi + 0.5])
    else:
        fig.update_xaxes(tickformat="d", rangemode="nonnegative")


def _run_name(run: RunView) -> str:
    return f"{run.label} · {run.run_id}"


DIGITS = {"points": 1, "nats": 3, "%": 1}


def interval_text(
    estimate: Any, low: Any = None, high: Any = None, unit: str = "", digits: int | None = None
) -> str:
    """ "+5.0 [+1.2, +8.8] points", "+5.0 points (no interval)" or "–" (no estimate)."""
    digits = DIGITS.get(unit, 1) if digits is None else digits
    if not _finite(estimate):
        return "–"
    unit = f" {unit}" if unit and unit != "%" else unit
    if _finite(low) and _finite(high):
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
        float(estimate) if _finite(estimate) else None,
        float(low) if _finite(low) else None,
        float(high) if _finite(high) else None,
        int(n) if _finite(n) else 0,
        reason=str(reason or "no interval"),
    )
    space = "" if unit == "%" else " "
    return interval.describe(f"{space}{unit}", DIGITS.get(unit, 1), higher_is_better)


def _finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _band(
    fig: go.Figure, x: Sequence[Any], low: Sequence[Any], high: Sequence[Any], *, color: str,
    run: RunView,
) -> None:  # fmt: skip
    """The paired 95% interval as a shaded band under a run's line (`meta.role` "band")."""
    x, low, high = list(x), list(low), list(high)
    fig.add_trace(
        go.Scatter(
            x=[*x, *x[::-1]], y=[*high, *low[::-1]], mode="lines", fill="toself",
            fillcolor=_translucent(color), line={"width": 0}, hoverinfo="skip",
            showlegend=False, legendgroup=run.run_id, name=f"{run.run_id} 95% interval",
            meta={"run": run.run_id, "method": run.method, "role": "band"},
        )
    )  # fmt: skip


def _line(
    fig: go.Figure, run: RunView, x: Sequence[Any], y: Sequence[Any], style: dict[str, str],
    hover: Sequence[str] | None = None, error_y: dict[str, Any] | None = None,
) -> None:  # fmt: skip
    """A run's line (`meta.role` "line"), hovering `hover` per point when given, with
    `error_y` bars when given."""
    extra: dict[str, Any] = {} if hover is None else {
        "customdata": list(hover), "hovertemplate": "%{customdata}<extra></extra>"}  # fmt: skip
    if error_y is not None:
        extra["error_y"] = error_y
    fig.add_trace(
        go.Scatter(
            x=list(x), y=list(y), mode="lines+markers", name=_run_name(run), line=style,
            legendgroup=run.run_id, meta={"run": run.run_id, "method": run.method, "role": "line"},
            **extra,
        )
    )  # fmt: skip


def loss_chart(runs: Sequence[RunView], statuses: Mapping[str, str] | None = None) -> go.Figure:
    """Training loss over steps, one line per run: the loss on the tokens training kept (a
    masking method leaves its masked tokens out of it, so methods differ in what it measures).
    `statuses` (run id -> job status) lets a run without loss say why (`no_loss_reason`)."""
    fig = go.Figure()
    styles = _styles(runs)
    notes = []
    for run in runs:
        frame = run.train_frame()
        if frame.empty:
            notes.append(
                f"{_run_name(run)}: {no_loss_reason(run, (statuses or {}).get(run.run_id))}."
            )
            continue
        _line(fig, run, frame["step"], frame["loss"], styles[run.run_id])
    _panel_layout(fig, "Training loss", "step", "loss on trained<br>(unmasked) tokens")
    return _finish(fig, notes, "No training steps logged yet.")


def is_evaluation_only(run: RunView, kind: str | None = None) -> bool:
    """An evaluation job's run (its config, or its job `kind`, says "eval"): no training."""
    return kind == "eval" or run.config.get("kind") == "eval"


def no_loss_reason(run: RunView, status: str | None = None, kind: str | None = None) -> str:
    """Why a run has no training loss to draw, from what the run is and its job's `status`
    (None: no job known): only an evaluation job's run is "evaluation-only"; a training run is
    queued, running (not past its first logged step: preparing data or evaluating step 0),
    failed or cancelled before its first step, or finished without a logged loss."""
    if is_evaluation_only(run, kind):
        return "an evaluation-only run (no training)"
    return {
        "queued": "a training run, queued: no step yet",
        "running": "a training run, running: no training step logged yet",
        "failed": "a training run that failed before logging a training step",
        "cancelled": "a training run cancelled before logging a training step",
    }.get(str(status), "a training run with no training loss logged")


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


def wilson_interval(p: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion `p` of `n` right/wrong items."""
    if n <= 0:
        return (math.nan, math.nan)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def metric_name(metric: str, task: str = "") -> str:
    """A metric key as a reader names it ("nll_easy" -> "NLL on base-easy tokens
    (diagnostic)"); a drift task's metric by `DRIFT_LABELS`; an unknown key with spaces."""
    if task and is_drift_task(task) and metric in DRIFT_LABELS:
        return DRIFT_LABELS[metric]
    return METRIC_LABELS.get(metric, metric.replace("_", " "))


def _chance_of(runs: Sequence[RunView], task: str) -> float | None:
    """A multiple-choice task's chance accuracy (0-1) as the runs' evaluation rounds know it
    (the mean of 1 / choices over its items), or None."""
    for run in runs:
        frame = run.changes()
        if frame.empty:
            continue
        known = [float(c) for t, c in zip(frame["task"], frame["chance"], strict=True)
                 if t == task and _finite(c)]  # fmt: skip
        if known:
            return known[0]
    return None


def metric_chart(runs: Sequence[RunView], task: str, metric: str | None = None) -> go.Figure:
    """One evaluation metric's raw value over steps (step 0 = the base model), one line per
    run (the Runs page's metric picker). A share (accuracy, agreement) gets a 0-1 axis and an
    accuracy its task's chance level as a dotted line; the step axis shows whole steps."""
    fig = go.Figure()
    styles = _styles(runs)
    name = metric
    for run in runs:
        frame = run.eval_frame()
        frame = frame[frame["task"] == task]
        if metric is not None:
            frame = frame[frame["metric"] == metric]
        if frame.empty:
            continue
        name = name or str(frame["metric"].iloc[0])
        frame = frame[frame["metric"] == name].sort_values("step")
        unit = name in UNIT_METRICS
        hover, error_y = [], None
        if name in BINARY_METRICS:  # each point's 95% interval over its items, as a bar
            bounds = [wilson_interval(float(v), int(n)) if _finite(v) and _finite(n)
                      else (math.nan, math.nan)
                      for v, n in zip(frame["value"], frame["n"], strict=True)]  # fmt: skip
            error_y = _point_bars(frame["value"], pd.Series([b[0] for b in bounds]),
                                  pd.Series([b[1] for b in bounds]))  # fmt: skip
            for s, v, n, (lo, hi) in zip(frame["step"], frame["value"], frame["n"], bounds,
                                         strict=True):  # fmt: skip
                shown = (
                    fmt.share(v)
                    if math.isnan(lo)
                    else (
                        f"{fmt.share(v)} [{fmt.share(lo)}, {fmt.share(hi)}] of {fmt.count(n)} items"
                    )
                )
                hover.append(f"{_run_name(run)}<br>step {int(s)}: {shown}")  # fmt: skip
        else:
            hover = [
                f"{_run_name(run)}<br>step {int(s)}: {fmt.share(v) if unit else fmt.num(v)}"
                for s, v in zip(frame["step"], frame["value"], strict=True)
            ]
        _line(fig, run, frame["step"], frame["value"], styles[run.run_id], hover, error_y)
    label = metric_label(task, name) if name else task
    y_title = metric_name(name, task) if name else "score"
    _base_layout(fig, label, "step", y_title)
    fit_step_axis(fig)
    if name in UNIT_METRICS:
        fig.update_yaxes(range=[-0.02, 1.02], tickformat=".0%")
    chance = _chance_of(runs, task) if name in ACCURACY_METRICS else None
    if chance is not None:
        fig.add_hline(y=chance, line={"color": "#9ca3af", "width": 1, "dash": "dot"})
        fig.add_trace(  # the chance line's label, in the legend rather than over the lines
            go.Scatter(
                x=[None], y=[None], mode="lines", name=f"chance ({fmt.share(chance)})",
                line={"color": "#9ca3af", "width": 1, "dash": "dot"}, hoverinfo="skip",
                meta={"role": "chance", "chance": chance},
            )
        )  # fmt: skip
    return _finish(fig, [], f"No {label} records in these runs.")


def metric_options(runs: Sequence[RunView]) -> list[tuple[str, str, str]]:
    """Every (task, metric, role) the runs recorded a number for (a metric that is always
    undefined, such as Δ bits per byte on prompt probes, is left out): target tasks first, a
    task's primary metric first (the metric picker's choices)."""
    seen: list[tuple[str, str, str]] = []
    measured: set[tuple[str, str, str]] = set()  # with a number at some step (not only NaN)
    for run in runs:
        frame = run.eval_frame()
        for task, metric, role, value in zip(
            frame["task"], frame["metric"], frame["role"], frame["value"], strict=True
        ):
            if (task, metric, role) not in seen:
                seen.append((task, metric, role))
            if _finite(value):
                measured.add((task, metric, role))
    seen = [key for key in seen if key in measured]
    order = {task: i for i, (task, _, _) in reversed(list(enumerate(seen)))}
    return sorted(seen, key=lambda t: (t[2] != "target", order[t[0]]))


def _translucent(color: str, alpha: float = 0.15) -> str:
    """An rgba() of a "#rrggbb" colour (other colour strings pass through)."""
    if color.startswith("#") and len(color) == 7:
        r, g, b = (int(color[i : i + 2], 16) for i in (1, 3, 5))
        return f"rgba({r},{g},{b},{alpha})"
    return color


def _delta_chart(
    runs: Sequence[RunView], rows_of: Any, *, accuracy: bool
) -> tuple[go.Figure, list[str]]:
    """Δ of one task's metric vs step 0 per run, each with its paired 95% band; the notes say
    each run's last change and its verdict, or why there is none."""
    fig = go.Figure()
    styles = _styles(runs)
    unit = "points" if accuracy else "nats"
    notes = []
    for run in runs:
        rows = rows_of(run)
        name = _run_name(run)
        if rows is None:
            continue
        if rows.empty:
            notes.append(f"{name}: no evaluation rounds yet.")
            continue
        rows = rows.sort_values("step")
        base_step = int(rows["base_step"].iloc[0])
        if rows["step"].max() == base_step:
            notes.append(f"{name}: only step {base_step} evaluated so far; a change needs a "
                         "later round.")  # fmt: skip
            continue
        known = rows[[_finite(v) for v in rows["delta"]]]
        if known.empty:
            notes.append(f"{name}: {rows['reason'].iloc[-1] or 'not scored'}.")
            continue
        texts = [
            f"step {int(r.step)}: "
            + change_text(
                r.delta, r.low, r.high, unit=unit, higher_is_better=accuracy, n=r.n, reason=r.reason
            )  # fmt: skip
            for r in known.itertuples()
        ]
        band = known[[_finite(lo) and _finite(hi) for lo, hi in zip(known["low"], known["high"],
                                                                       strict=True)]]  # fmt: skip
        error_y = None
        if len(band) >= 2:
            _band(fig, band["step"], band["low"], band["high"],
                  color=styles[run.run_id]["color"], run=run)  # fmt: skip
        elif len(band) == 1:  # one interval: a band needs two, so a bar on its point
            error_y = _point_bars(known["delta"], known["low"], known["high"])
        _line(fig, run, known["step"], known["delta"], styles[run.run_id], texts, error_y)
        vs = f" vs step {base_step}" if base_step else ""
        notes.append(f"{name}, {texts[-1]}{vs}.")
    fig.add_hline(y=0, line={"color": "#6b7280", "width": 1})
    return fig, notes


def _point_bars(values: pd.Series, low: pd.Series, high: pd.Series) -> dict[str, Any]:
    """`error_y` of a line: each point's 95% interval as a bar where it has one (0 elsewhere),
    for a run with too few intervals to draw a band."""
    up, down = [], []
    for v, lo, hi in zip(values, low, high, strict=True):
        bounded = _finite(v) and _finite(lo) and _finite(hi)
        up.append(float(hi) - float(v) if bounded else 0.0)
        down.append(float(v) - float(lo) if bounded else 0.0)
    return {"type": "data", "symmetric": False, "thickness": 1.5, "width": 5, "array": up,
            "arrayminus": down}  # fmt: skip


def _task_rows(task: str, metric: str | None = None) -> Any:
    def rows_of(run: RunView) -> pd.DataFrame | None:
        frame = run.changes()
        if frame.empty:
            return frame
        frame = frame[frame["task"] == task]
        if metric is not None:
            frame = frame[frame["metric"] == metric]
        return None if frame.empty else frame

    return rows_of


def target_delta_chart(runs: Sequence[RunView]) -> go.Figure:
    """The headline: the change of each run's target metric from step 0 (accuracy in points when
    the suite has a target accuracy task, else the full-token reference NLL in nats, never the
    easy-token NLL), with the paired 95% interval over items as a band."""
    targets = {run.run_id: run.target_task() for run in runs}
    chosen = next((t for t in targets.values() if t is not None), None)
    notes = []
    if chosen is None:
        fig = go.Figure()
        fig.add_hline(y=0, line={"color": "#6b7280", "width": 1})
        _panel_layout(fig, "Target Δ vs step 0", "step", "Δ target")
        notes = [f"{_run_name(run)}: no evaluation rounds yet." for run in runs]
        return _finish(fig, notes, "No evaluation rounds yet.")
    task, metric = chosen
    accuracy = _is_accuracy(runs, task, metric)
    drawn = [run for run in runs if targets[run.run_id] in (chosen, None)]
    fig, notes = _delta_chart(drawn, _task_rows(task, metric), accuracy=accuracy)
    if accuracy:  # a multiple-choice target: where chance lies on the Δ scale
        _add_delta_chance(fig, drawn, task)
    for run in runs:
        if run not in drawn:
            other = targets[run.run_id]
            notes.append(f"{_run_name(run)}: its target is {other[0]} {other[1]}, another "
                         "metric: compare it in the per-task charts.")  # fmt: skip
    unit, better = ("points", "higher") if accuracy else ("nats", "lower")
    _panel_layout(
        fig, "Target Δ vs step 0", "step", f"Δ {task} {metric_name(metric, task)}, {unit}", better
    )
    return _finish(fig, notes, "No change to show yet.")


def _is_accuracy(runs: Sequence[RunView], task: str, metric: str) -> bool:
    for run in runs:
        frame = run.changes()
        frame = frame[(frame["task"] == task) & (frame["metric"] == metric)]
        if not frame.empty:
            return bool(frame["accuracy"].iloc[0])
    return metric != "nll"


def _first_rows(runs: Sequence[RunView], task: str) -> Iterator[pd.Series]:
    """Each run's change row of `task` at its first evaluated step (runs without it skipped)."""
    for run in runs:
        frame = run.changes()
        frame = frame[frame["task"] == task] if not frame.empty else frame
        if not frame.empty:
            yield frame.sort_values("step").iloc[0]


def _add_delta_chance(fig: go.Figure, runs: Sequence[RunView], task: str) -> None:
    """A multiple-choice task's chance level on a Δ-in-points chart (Δ = chance − base, per
    distinct base), dotted, named in the legend rather than by a label over the lines."""
    chance_at = []
    for first in _first_rows(runs, task):
        if _finite(first["chance"]) and _finite(first["base"]):
            chance_at.append(round(100.0 * (float(first["chance"]) - float(first["base"])), 1))
    for y in sorted(set(chance_at)):
        fig.add_hline(y=y, line={"color": "#9ca3af", "width": 1, "dash": "dot"})
        fig.add_trace(
            go.Scatter(
                x=[None], y=[None], mode="lines", name=f"chance (Δ {fmt.signed(y, 1)} points)",
                line={"color": "#9ca3af", "width": 1, "dash": "dot"}, hoverinfo="skip",
                meta={"role": "chance", "chance": y},
            )
        )  # fmt: skip


def task_delta_chart(runs: Sequence[RunView], task: str) -> go.Figure:
    """Δ of one task's primary metric vs step 0, one line and paired 95% band per run; for a
    multiple-choice task, where chance lies on the same scale (Δ = chance − base), and whether
    the base model is at chance (then the task says nothing about forgetting and stays out of
    BWT)."""
    metric, accuracy, role, at_chance = "", True, "ood", False
    for first in _first_rows(runs, task):
        metric = metric or str(first["metric"])
        accuracy, role = bool(first["accuracy"]), str(first["role"])
        at_chance = at_chance or bool(first["at_chance"])
    fig, notes = _delta_chart(runs, _task_rows(task), accuracy=accuracy)
    _add_delta_chance(fig, runs, task)
    title = f"{task} {metric_name(metric, task)} Δ ({'target' if role == 'target' else 'OOD'})"
    if at_chance:
        title += " · at chance"
        notes.insert(0, f"At chance: the base model's {metric_name(metric, task)} on {task} is "
                     "within its 95% "
                     "interval of chance, so a change there says nothing about forgetting "
                     "(left out of BWT).")  # fmt: skip
    unit, better = ("points", "higher") if accuracy else ("nats", "lower")
    _panel_layout(fig, title, "step", f"Δ {metric_name(metric, task)}, {unit}", better)
    return _finish(fig, notes, "No change to show yet.")


def task_delta_charts(
    runs: Sequence[RunView], skip: Collection[str] = ()
) -> list[tuple[str, go.Figure]]:
    """(key, chart) per evaluated task, target tasks first: `task_delta_chart` of each, or
    `drift_chart` for a drift probe; tasks in `skip` (charted elsewhere) are left out."""
    tasks: list[tuple[str, str]] = []
    drift: set[str] = set()
    for run in runs:
        frame = run.changes()
        for task, role, metric in zip(frame["task"], frame["role"], frame["metric"], strict=True):
            if (task, role) not in tasks and task not in dict(tasks) and task not in skip:
                tasks.append((task, role))
            if metric == DRIFT_METRIC:
                drift.add(task)
    tasks.sort(key=lambda t: t[1] != "target")  # stable: first-seen order within a role
    return [
        (f"task-{_slug(task)}",
         drift_chart(runs, task) if task in drift else task_delta_chart(runs, task))
        for task, _ in tasks
    ]  # fmt: skip


def top_row_charts(
    runs: Sequence[RunView], statuses: Mapping[str, str] | None = None
) -> list[tuple[str, go.Figure]]:
    """The three charts a reader looks at first, as (key, chart): the target's change vs step 0,
    BWT and the training loss, every run overlaid (`statuses`: see `loss_chart`)."""
    return [("target", target_delta_chart(runs)), ("bwt", bwt_chart(runs)),
            ("loss", loss_chart(runs, statuses))]  # fmt: skip


def _slug(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z_-]+", "_", text)


def bwt_chart(runs: Sequence[RunView]) -> go.Figure:
    """Backward transfer (mean relative change on out-of-domain accuracy tasks above chance, %)
    over steps, with the paired 95% interval over items as a band where the run has one."""
    fig = go.Figure()
    styles = _styles(runs)
    notes = []
    for run in runs:
        frame = run.summary_frame()
        known = frame.dropna(subset=["bwt"])
        name = _run_name(run)
        if known.empty:
            summary = latest(run.records, EvalSummaryRecord)
            why = [n for n in (summary.notes if summary else []) if n.startswith("BWT")]
            notes.append(f"{name}: no BWT. " + (" ".join(why) if why else "No evaluation "
                         "rounds with out-of-domain accuracy yet."))  # fmt: skip
            continue
        texts = [
            f"step {int(r.step)}: "
            + change_text(
                r.bwt, r.bwt_low, r.bwt_high, unit="%", reason="too few items or no per-item scores"
            )  # fmt: skip
            for r in known.itertuples()
        ]
        band = known.dropna(subset=["bwt_low", "bwt_high"])
        error_y = None
        if len(band) >= 2:
            _band(fig, band["step"], band["bwt_low"], band["bwt_high"],
                  color=styles[run.run_id]["color"], run=run)  # fmt: skip
        elif len(band) == 1:  # one interval: a bar on its point
            error_y = _point_bars(known["bwt"], known["bwt_low"], known["bwt_high"])
        _line(fig, run, known["step"], known["bwt"], styles[run.run_id], texts, error_y)
        if len(known) == 1:
            notes.append(f"{name}: only step {int(known['step'].iloc[0])} so far; BWT needs a "
                         "later round.")  # fmt: skip
        else:
            notes.append(f"{name}, {texts[-1]}.")
    fig.add_hline(y=0, line={"color": "#6b7280", "width": 1})
    _panel_layout(fig, "BWT: out-of-domain change", "step", "BWT, %", "higher")
    return _finish(fig, notes, "No BWT to draw (see the note below).")


# --------------------------------------------------------------------------- drift from the base

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
KL_AXIS = "token KL from base, nats"


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


def _drift_rows(run: RunView, task: str) -> pd.DataFrame:
    frame = run.changes()
    if frame.empty:
        return frame
    return frame[(frame["task"] == task) & (frame["metric"] == DRIFT_METRIC)]


def drift_chart(runs: Sequence[RunView], task: str = OOD_DRIFT) -> go.Figure:
    """A drift probe's token KL(base ‖ tuned) over training steps, one line per run (0 at step 0,
    the base model), with its paired 95% interval over probe items as a band, or as an interval
    bar when the run has a single round after step 0. The axis starts at 0 (a KL is never
    negative). Runs whose rounds hold no such probe (evaluated before drift was measured) are
    named in the notes."""
    fig = go.Figure()
    styles = _styles(runs)
    title = probe_title(task)
    notes: list[str] = []
    values: list[float] = []
    for run in runs:
        name = _run_name(run)
        rows = _drift_rows(run, task)
        if run.changes().empty:
            notes.append(f"{name}: no evaluation rounds yet.")
            continue
        if rows.empty:
            notes.append(f"{name}: no {probe_noun(task)} measured (its rounds were evaluated "
                         "before drift was measured, or without this probe).")  # fmt: skip
            continue
        rows = rows.sort_values("step")
        base_step = int(rows["base_step"].iloc[0])
        known = rows[[_finite(v) for v in rows["delta"]]]
        if rows["step"].max() == base_step:
            notes.append(f"{name}: only step {base_step} evaluated so far (the base model: no "
                         "drift by definition); drift needs a later round.")  # fmt: skip
            continue
        if known.empty:
            notes.append(f"{name}: {rows['reason'].iloc[-1] or 'not scored'}.")
            continue
        texts = [
            f"step {int(r.step)}: KL "
            + (value_text(r.delta, r.low, r.high, "nats") if _finite(r.low) and _finite(r.high)
               else f"{float(r.delta):.3f} nats ({r.reason or 'no interval'})")
            for r in known.itertuples()
        ]  # fmt: skip
        bounded = [_finite(lo) and _finite(hi) for lo, hi in zip(known["low"], known["high"],
                                                                  strict=True)]  # fmt: skip
        after = known[known["step"] > base_step]
        error_y = None
        if len(after) >= 2:
            band = known[bounded]
            if len(band) >= 2:
                _band(fig, band["step"], band["low"], band["high"],
                      color=styles[run.run_id]["color"], run=run)  # fmt: skip
        elif len(after) == 1 and _finite(after["low"].iloc[0]) and _finite(after["high"].iloc[0]):
            last = after.index[0]  # the one round after step 0: an interval bar on its point
            error_y = {
                "type": "data", "symmetric": False, "thickness": 1.5, "width": 5,
                "array": [float(r.high - r.delta) if r.Index == last else 0.0
                          for r in known.itertuples()],
                "arrayminus": [float(r.delta - r.low) if r.Index == last else 0.0
                               for r in known.itertuples()],
            }  # fmt: skip
        _line(fig, run, known["step"], known["delta"], styles[run.run_id], texts, error_y)
        values += [float(v) for v in (*known["delta"], *known["low"], *known["high"])
                   if _finite(v)]  # fmt: skip
        base = rows["base"].iloc[0]
        if _finite(base) and float(base) > 0:
            notes.append(f"{name}: its first round (step {base_step}) already differs from the "
                         "base model, so the line is the change of KL from that round.")  # fmt: skip
        notes.append(f"{name}, {texts[-1]}.")
    _panel_layout(fig, f"{title}: KL from the base model", "step", KL_AXIS)
    if values and min(values) >= 0:  # a KL: the axis starts at 0 (the base model)
        top = max(values)
        fig.update_yaxes(range=[0.0, 1.1 * top if top > 0 else 1.0], rangemode="tozero")
        fig.update_xaxes(rangemode="nonnegative")
    return _finish(fig, notes, f"No {probe_noun(task)} to show yet.")


def drift_charts(runs: Sequence[RunView]) -> list[tuple[str, go.Figure]]:
    """(key, chart) of the two drift probes a reader looks at beside the target's change and
    BWT: OOD drift ("ood_drift") and target drift ("target_drift"), every run overlaid."""
    return [("ood-drift", drift_chart(runs, OOD_DRIFT)),
            ("target-drift", drift_chart(runs, TARGET_DRIFT))]  # fmt: skip


def _error_bars(values: pd.Series, low: pd.Series, high: pd.Series) -> dict[str, Any]:
    """Asymmetric error bars from each value to its interval's bounds (none where unknown)."""
    return {
        "type": "data", "symmetric": False, "thickness": 1.5, "width": 4,
        "array": [h - v if _finite(h) else None for v, h in zip(values, high, strict=True)],
        "arrayminus": [v - lo if _finite(lo) else None for v, lo in zip(values, low, strict=True)],
    }  # fmt: skip


def drift_frontier_chart(
    table: pd.DataFrame, drift: pd.DataFrame, missing: Mapping[str, str] | None = None,
    task: str = OOD_DRIFT,
) -> go.Figure:  # fmt: skip
    """Target gain against drift: each run's target Δ vs step 0 (x, from a `runs_table`, with its
    paired 95% interval) against its token KL from the base on the `task` probe at its latest
    drift round (y, from `core.study.runs.drift_table`, with its 95% interval over probe items),
    error bars both ways, one marker per run labelled by its method. Runs without a drift round
    after step 0 are left out and named in the notes, with the reason `missing` gives (run id ->
    why)."""
    fig = go.Figure()
    notes: list[str] = []
    missing = dict(missing or {})
    kl = pd.DataFrame()
    if not drift.empty:
        kl = drift[(drift["task"] == task) & (drift["metric"] == DRIFT_METRIC)]
    by_run = {str(r["run"]): r for _, r in kl.iterrows()}
    rows: list[dict[str, Any]] = []
    left_out: dict[str, list[str]] = {}
    unit = None
    title = probe_title(task)
    for _, row in table.iterrows() if not table.empty else ():
        name = f"{row['label']} · {row['run']}"
        found = by_run.get(str(row["run"]))
        if found is None:
            why = missing.get(str(row["run"]), f"no {probe_noun(task)} measured after step 0")
            left_out.setdefault(why, []).append(name)
            continue
        if not _finite(row.get("target Δ")):
            left_out.setdefault("no target change yet", []).append(name)
            continue
        unit = unit or str(row.get("target Δ unit") or "")
        if str(row.get("target Δ unit") or "") != unit:
            left_out.setdefault(f"its target Δ is not in {unit} like the others",
                                []).append(name)  # fmt: skip
            continue
        rows.append({"run": row["run"], "label": row["label"], "method": row["method"],
                     "target": row.get("target"), "x": float(row["target Δ"]),
                     "x_low": row.get("target Δ low"), "x_high": row.get("target Δ high"),
                     "y": float(found["value"]), "y_low": found["low"],
                     "y_high": found["high"], "step": int(found["step"])})  # fmt: skip
    data = pd.DataFrame(rows)
    for method, group in data.groupby("method", sort=False) if not data.empty else ():
        hover = [
            f"{r.label} · {r.run}<br>target Δ {interval_text(r.x, r.x_low, r.x_high, unit)}<br>"
            f"{title} at step {r.step}: KL {value_text(r.y, r.y_low, r.y_high, 'nats')}"
            for r in group.itertuples()
        ]  # fmt: skip
        fig.add_trace(
            go.Scatter(
                x=group["x"].tolist(), y=group["y"].tolist(), mode="markers+text",
                name=str(method), text=group["label"].tolist(), textposition="top center",
                marker={"size": 12, "color": method_color(str(method))},
                customdata=hover, hovertemplate="%{customdata}<extra></extra>",
                error_x=_error_bars(group["x"], group["x_low"], group["x_high"]),
                error_y=_error_bars(group["y"], group["y_low"], group["y_high"]),
                meta={"role": "line", "runs": list(group["run"])},
            )
        )  # fmt: skip
    for why, names in left_out.items():
        notes.append(f"Not drawn, {why}: {', '.join(names)}.")
    no_interval = [f"{r.label} · {r.run}" for r in data.itertuples()
                   if not all(_finite(v) for v in (r.x_low, r.x_high, r.y_low, r.y_high))]  # fmt: skip
    if no_interval:
        notes.append("No interval (too few items or no per-item scores) for: "
                     + ", ".join(no_interval) + ".")  # fmt: skip
    if len(data) == 1:
        notes.insert(0, "One run: its point with the 95% intervals of its target change and its "
                     "drift. A comparison needs a second run.")  # fmt: skip
    accuracy = unit == "points"
    target = data["target"].iloc[0] if not data.empty else ""
    target = target if isinstance(target, str) else ""
    x_title = f"target Δ{f' ({target})' if target else ''}, {unit or 'vs step 0'}"
    x_title += " (right is better)" if accuracy else (" (left is better)" if unit else "")
    fig.add_vline(x=0, line={"color": "#9ca3af", "width": 1})
    _base_layout(fig, f"Target gain vs {probe_noun(task)}", x_title,
                 f"{title}: {KL_AXIS}<br>(lower: closer to the base)")  # fmt: skip
    if not data.empty:
        top = max(float(v) for v in (*data["y"], *data["y_high"]) if _finite(v))
        fig.update_yaxes(range=[0.0, 1.15 * top if top > 0 else 1.0], rangemode="tozero")
    return _finish(fig, notes, f"No run has both a target change and {probe_noun(task)} yet.")


def _column(table: pd.DataFrame, name: str) -> pd.Series:
    return (
        table[name] if name in table.columns else pd.Series([None] * len(table), index=table.index)
    )


def frontier_chart(table: pd.DataFrame) -> go.Figure:
    """Forgetting frontier: target change (TI, %) vs out-of-domain change (BWT, %) per run, with
    their paired 95% intervals as error bars in both directions. One run is drawn on its own
    (its point and intervals), with a note that a comparison needs a second run."""
    fig = go.Figure()
    notes: list[str] = []
    data = pd.DataFrame()
    if not table.empty and {"TI", "BWT"} <= set(table.columns):
        data = table[[_finite(t) and _finite(b) for t, b in zip(table["TI"], table["BWT"],
                                                                 strict=True)]]  # fmt: skip
        for row in table.drop(index=data.index).itertuples():
            why = [n for n in str(getattr(row, "notes", "") or "").split(". ")
                   if n.startswith(("BWT undefined", "TI undefined", "TI:"))]  # fmt: skip
            missing = " and ".join(n for n, v in (("TI", row.TI), ("BWT", row.BWT))
                                   if not _finite(v))  # fmt: skip
            reason = ". ".join(why).rstrip(".") if why else "see the run's notes"
            notes.append(f"{row.label} · {row.run}: not drawn, no {missing} ({reason}).")
    for method, group in data.groupby("method", sort=False) if not data.empty else ():
        bwt, ti = group["BWT"].astype(float), group["TI"].astype(float)
        bars = {}
        for axis, value, name in (("error_x", bwt, "BWT"), ("error_y", ti, "TI")):
            low, high = _column(group, f"{name} low"), _column(group, f"{name} high")
            bars[axis] = {
                "type": "data", "symmetric": False, "thickness": 1.5, "width": 4,
                "array": [h - v if _finite(h) else None for v, h in zip(value, high, strict=True)],
                "arrayminus": [v - lo if _finite(lo) else None
                               for v, lo in zip(value, low, strict=True)],
            }  # fmt: skip
        hover = [
            f"{label} · {run}<br>BWT {interval_text(b, bl, bh, '%')}<br>"
            f"TI {interval_text(t, tl, th, '%')}"
            for label, run, b, bl, bh, t, tl, th in zip(
                group["label"], group["run"], bwt, _column(group, "BWT low"),
                _column(group, "BWT high"), ti, _column(group, "TI low"),
                _column(group, "TI high"), strict=True,
            )
        ]  # fmt: skip
        fig.add_trace(
            go.Scatter(
                x=bwt.tolist(), y=ti.tolist(), mode="markers", name=str(method),
                marker={"size": 12, "color": method_color(str(method))},
                customdata=hover, hovertemplate="%{customdata}<extra></extra>",
                meta={"role": "line", "runs": list(group["run"])}, **bars,
            )
        )  # fmt: skip
    no_interval = [
        f"{row['label']} · {row['run']}"
        for _, row in data.iterrows()
        if not all(_finite(row.get(c)) for c in ("BWT low", "BWT high", "TI low", "TI high"))
    ]
    if no_interval:
        notes.append("No interval (too few items or no per-item scores) for: "
                     + ", ".join(no_interval) + ".")  # fmt: skip
    if len(data) == 1:
        notes.insert(0, "One run: its point with the paired 95% intervals of TI and BWT (each "
                     "against its own step 0). A comparison needs a second run.")  # fmt: skip
    fig.add_hline(y=0, line={"color": "#9ca3af", "width": 1})
    fig.add_vline(x=0, line={"color": "#9ca3af", "width": 1})
    _base_layout(
        fig, "Forgetting frontier (up and right is better)", "BWT: out-of-domain change %",
        "TI: target change %",
    )  # fmt: skip
    return _finish(fig, notes, "No run has both TI and BWT yet.")


def score_vs_masked_chart(table: pd.DataFrame, columns: Sequence[str]) -> go.Figure:
    """Scores vs % of response tokens masked in training, one line per task (a τ sweep)."""
    fig = go.Figure()
    if not table.empty and "masked %" in table.columns:
        data = table.copy()
        data["masked %"] = data["masked %"].fillna(0.0)
        data = data.sort_values("masked %")
        for column in columns:
            if column not in data.columns:
                continue
            part = data.dropna(subset=[column])
            fig.add_trace(
                go.Scatter(
                    x=part["masked %"], y=part[column], mode="lines+markers", name=column,
                    text=part["label"],
                )
            )  # fmt: skip
    return _panel_layout(fig, "Score vs % tokens masked", "% response tokens masked", "score")


LORA_COLUMNS = {"fro_norm": "‖ΔW‖_F", "effective_rank": "effective rank"}


def lora_chart(stats: pd.DataFrame, column: str) -> go.Figure:
    """One LoRA weight-change statistic (`core.study.diagnostics.lora_weight_stats`) per layer, a bar
    per adapted module kind."""
    fig = go.Figure()
    for kind, group in stats.groupby("kind", sort=True):
        fig.add_trace(go.Bar(x=group["layer"], y=group[column], name=str(kind)))
    fig.update_layout(barmode="group")
    title = LORA_COLUMNS.get(column, column)
    return _base_layout(fig, f"{title} per layer", "layer", title)


def ppl_change_histogram(frame: pd.DataFrame, tau: float = DEFAULT_TAU) -> go.Figure:
    """Distribution of the per-token change Δ ln ppl (fine-tuned − original), split by whether
    the original model found the token easy (ppl ≤ τ) or surprising (ppl > τ)."""
    fig = go.Figure()
    groups = (
        ("easy", f"base ppl ≤ {fmt.tau(tau)}", "#0072B2"),
        ("hard", f"base ppl > {fmt.tau(tau)}", "#D55E00"),
    )
    bins = None  # one set of bins for both groups, so their bars line up
    if not frame.empty:
        lo, hi = float(frame["delta"].min()), float(frame["delta"].max())
        bins = {"start": lo, "end": hi + 1e-9, "size": max(hi - lo, 1e-6) / 40}
    for name, label, color in groups:
        part = frame[frame["base_easy"] == (name == "easy")] if not frame.empty else frame
        if part.empty:
            continue
        fig.add_trace(
            go.Histogram(
                x=part["delta"], name=f"{label} ({len(part)} tokens)", marker_color=color,
                opacity=0.7, xbins=bins, meta={"group": name},
            )
        )  # fmt: skip
    fig.update_layout(barmode="overlay")
    fig.add_vline(x=0, line={"color": "#9ca3af", "width": 1})
    return _base_layout(
        fig, "Token perplexity change after fine-tuning", "Δ ln ppl (< 0: easier, > 0: harder)",
        "tokens",
    )  # fmt: skip


def training_loss_figure(records: Sequence[Any]) -> go.Figure:
    """One run's training loss per step (the latest record per step wins, so a resumed run is
    clean), with a dotted line where it resumed."""
    by_step = loss_by_step(records)
    steps = sorted(by_step)
    fig = go.Figure(
        go.Scatter(x=steps, y=[by_step[s] for s in steps], mode="lines+markers", name="loss")
    )
    for start in of_kind(as_records(records), StartRecord):
        if start.step:
            fig.add_vline(x=start.step, line_dash="dot", annotation_text="resumed")
    fig.update_layout(
        height=320,
        margin=dict(l=10, r=10, t=40, b=10),
        title="Training loss (trained tokens only)",
        xaxis_title="step",
        yaxis_title="loss",
    )
    return fig
