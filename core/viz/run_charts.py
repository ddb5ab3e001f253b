"""Plotly builders for training runs over their steps (pure: `RunData` in, `go.Figure` out):
the three a reader looks at first (`top_row_charts`: the target's change vs step 0, BWT, the
training loss), each task's change (`task_delta_charts`), a raw metric (`metric_chart`) and the
drift probes' KL (`drift_charts`), every run overlaid with its paired 95% interval as a band.

A run is anything shaped like `core.viz.run_style.RunData` (the study layer's `RunData` is
one); the comparison charts of finished runs are in `core.viz.compare_charts`, the metric
names in `core.eval.labels`. This module re-exports the names pages and tests import from it.
Used by the Runs and Compare pages and by the HTML report.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from core import fmt
from core.eval.labels import (
    ACCURACY_METRICS,
    BINARY_METRICS,
    DRIFT_METRIC,
    OOD_DRIFT,
    TARGET_DRIFT,
    UNIT_METRICS,
    change_text,
    finite,
    metric_label,
    metric_name,
    probe_noun,
    probe_title,
)
from core.fmt import value_text
from core.jobs.metrics import (
    EvalSummaryRecord,
    StartRecord,
    as_records,
    latest,
    loss_by_step,
    of_kind,
)
from core.viz.compare_charts import (
    LORA_COLUMNS,
    drift_frontier_chart,
    frontier_chart,
    lora_chart,
    ppl_change_histogram,
    score_vs_masked_chart,
)
from core.viz.run_style import (
    KL_AXIS,
    METHOD_COLORS,
    RunData,
    _band,
    _band_or_bars,
    _finish,
    _line,
    _panel_layout,
    _point_bars,
    _run_name,
    _styles,
    figure_notes,
    fit_step_axis,
    method_color,
)
from core.viz.style import _base_layout

#: What pages, tests and the report import from here: this module's builders, and the names
#: that moved to `core.eval.labels`, `core.viz.compare_charts` and `core.viz.run_style`.
__all__ = [
    "LORA_COLUMNS",
    "METHOD_COLORS",
    "OOD_DRIFT",
    "TARGET_DRIFT",
    "RunData",
    "bwt_chart",
    "change_text",
    "drift_chart",
    "drift_charts",
    "drift_frontier_chart",
    "figure_notes",
    "fit_step_axis",
    "frontier_chart",
    "is_evaluation_only",
    "loss_chart",
    "lora_chart",
    "method_color",
    "metric_chart",
    "metric_label",
    "metric_name",
    "metric_options",
    "no_loss_reason",
    "ppl_change_histogram",
    "score_vs_masked_chart",
    "target_delta_chart",
    "task_delta_chart",
    "task_delta_charts",
    "top_row_charts",
    "training_loss_figure",
    "value_text",
    "wilson_interval",
]


def loss_chart(runs: Sequence[RunData], statuses: Mapping[str, str] | None = None) -> go.Figure:
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
    return _finish(fig, notes, "No training steps logged yet.", panel=True)


def is_evaluation_only(run: RunData, kind: str | None = None) -> bool:
    """An evaluation job's run (its config, or its job `kind`, says "eval"): no training."""
    return kind == "eval" or run.config.get("kind") == "eval"


def no_loss_reason(run: RunData, status: str | None = None, kind: str | None = None) -> str:
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


def wilson_interval(p: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion `p` of `n` right/wrong items."""
    if n <= 0:
        return (math.nan, math.nan)
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _chance_of(runs: Sequence[RunData], task: str) -> float | None:
    """A multiple-choice task's chance accuracy (0-1) as the runs' evaluation rounds know it
    (the mean of 1 / choices over its items), or None."""
    for run in runs:
        frame = run.changes()
        if frame.empty:
            continue
        known = [
            float(c)
            for t, c in zip(frame["task"], frame["chance"], strict=True)
            if t == task and finite(c)
        ]
        if known:
            return known[0]
    return None


def metric_chart(runs: Sequence[RunData], task: str, metric: str | None = None) -> go.Figure:
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
            bounds = [
                wilson_interval(float(v), int(n))
                if finite(v) and finite(n)
                else (math.nan, math.nan)
                for v, n in zip(frame["value"], frame["n"], strict=True)
            ]
            error_y = _point_bars(
                frame["value"], pd.Series([b[0] for b in bounds]), pd.Series([b[1] for b in bounds])
            )
            for s, v, n, (lo, hi) in zip(
                frame["step"], frame["value"], frame["n"], bounds, strict=True
            ):
                shown = (
                    fmt.share(v)
                    if math.isnan(lo)
                    else (
                        f"{fmt.share(v)} [{fmt.share(lo)}, {fmt.share(hi)}] of {fmt.count(n)} items"
                    )
                )
                hover.append(f"{_run_name(run)}<br>step {int(s)}: {shown}")
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
                x=[None],
                y=[None],
                mode="lines",
                name=f"chance ({fmt.share(chance)})",
                line={"color": "#9ca3af", "width": 1, "dash": "dot"},
                hoverinfo="skip",
                meta={"role": "chance", "chance": chance},
            )
        )
    return _finish(fig, [], f"No {label} records in these runs.")


def metric_options(runs: Sequence[RunData]) -> list[tuple[str, str, str]]:
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
            if finite(value):
                measured.add((task, metric, role))
    seen = [key for key in seen if key in measured]
    order = {task: i for i, (task, _, _) in reversed(list(enumerate(seen)))}
    return sorted(seen, key=lambda t: (t[2] != "target", order[t[0]]))


def _delta_chart(
    runs: Sequence[RunData], rows_of: Any, *, accuracy: bool
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
            notes.append(
                f"{name}: only step {base_step} evaluated so far; a change needs a later round."
            )
            continue
        known = rows[[finite(v) for v in rows["delta"]]]
        if known.empty:
            notes.append(f"{name}: {rows['reason'].iloc[-1] or 'not scored'}.")
            continue
        texts = [
            f"step {int(r.step)}: "
            + change_text(
                r.delta, r.low, r.high, unit=unit, higher_is_better=accuracy, n=r.n, reason=r.reason
            )
            for r in known.itertuples()
        ]
        error_y = _band_or_bars(
            fig, known, "delta", "low", "high", color=styles[run.run_id]["color"], run=run
        )
        _line(fig, run, known["step"], known["delta"], styles[run.run_id], texts, error_y)
        vs = f" vs step {base_step}" if base_step else ""
        notes.append(f"{name}, {texts[-1]}{vs}.")
    fig.add_hline(y=0, line={"color": "#6b7280", "width": 1})
    return fig, notes


def _task_rows(task: str, metric: str | None = None) -> Any:
    def rows_of(run: RunData) -> pd.DataFrame | None:
        frame = run.changes()
        if frame.empty:
            return frame
        frame = frame[frame["task"] == task]
        if metric is not None:
            frame = frame[frame["metric"] == metric]
        return None if frame.empty else frame

    return rows_of


def target_delta_chart(runs: Sequence[RunData]) -> go.Figure:
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
        return _finish(fig, notes, "No evaluation rounds yet.", panel=True)
    task, metric = chosen
    accuracy = _is_accuracy(runs, task, metric)
    drawn = [run for run in runs if targets[run.run_id] in (chosen, None)]
    fig, notes = _delta_chart(drawn, _task_rows(task, metric), accuracy=accuracy)
    if accuracy:  # a multiple-choice target: where chance lies on the Δ scale
        _add_delta_chance(fig, drawn, task)
    for run in runs:
        if run not in drawn:
            other = targets[run.run_id]
            notes.append(
                f"{_run_name(run)}: its target is {other[0]} {other[1]}, another "
                "metric: compare it in the per-task charts."
            )
    unit, better = ("points", "higher") if accuracy else ("nats", "lower")
    _panel_layout(
        fig, "Target Δ vs step 0", "step", f"Δ {task} {metric_name(metric, task)}, {unit}", better
    )
    return _finish(fig, notes, "No change to show yet.", panel=True)


def _is_accuracy(runs: Sequence[RunData], task: str, metric: str) -> bool:
    for run in runs:
        frame = run.changes()
        frame = frame[(frame["task"] == task) & (frame["metric"] == metric)]
        if not frame.empty:
            return bool(frame["accuracy"].iloc[0])
    return metric != "nll"


def _first_rows(runs: Sequence[RunData], task: str) -> Iterator[pd.Series]:
    """Each run's change row of `task` at its first evaluated step (runs without it skipped)."""
    for run in runs:
        frame = run.changes()
        frame = frame[frame["task"] == task] if not frame.empty else frame
        if not frame.empty:
            yield frame.sort_values("step").iloc[0]


def _add_delta_chance(fig: go.Figure, runs: Sequence[RunData], task: str) -> None:
    """A multiple-choice task's chance level on a Δ-in-points chart (Δ = chance − base, per
    distinct base), dotted, named in the legend rather than by a label over the lines."""
    chance_at = []
    for first in _first_rows(runs, task):
        if finite(first["chance"]) and finite(first["base"]):
            chance_at.append(round(100.0 * (float(first["chance"]) - float(first["base"])), 1))
    for y in sorted(set(chance_at)):
        fig.add_hline(y=y, line={"color": "#9ca3af", "width": 1, "dash": "dot"})
        fig.add_trace(
            go.Scatter(
                x=[None],
                y=[None],
                mode="lines",
                name=f"chance (Δ {fmt.signed(y, 1)} points)",
                line={"color": "#9ca3af", "width": 1, "dash": "dot"},
                hoverinfo="skip",
                meta={"role": "chance", "chance": y},
            )
        )


def task_delta_chart(runs: Sequence[RunData], task: str) -> go.Figure:
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
        notes.insert(
            0,
            f"At chance: the base model's {metric_name(metric, task)} on {task} is "
            "within its 95% "
            "interval of chance, so a change there says nothing about forgetting "
            "(left out of BWT).",
        )
    unit, better = ("points", "higher") if accuracy else ("nats", "lower")
    _panel_layout(fig, title, "step", f"Δ {metric_name(metric, task)}, {unit}", better)
    return _finish(fig, notes, "No change to show yet.", panel=True)


def task_delta_charts(
    runs: Sequence[RunData], skip: Collection[str] = ()
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
        (
            f"task-{_slug(task)}",
            drift_chart(runs, task) if task in drift else task_delta_chart(runs, task),
        )
        for task, _ in tasks
    ]


def top_row_charts(
    runs: Sequence[RunData], statuses: Mapping[str, str] | None = None
) -> list[tuple[str, go.Figure]]:
    """The three charts a reader looks at first, as (key, chart): the target's change vs step 0,
    BWT and the training loss, every run overlaid (`statuses`: see `loss_chart`)."""
    return [
        ("target", target_delta_chart(runs)),
        ("bwt", bwt_chart(runs)),
        ("loss", loss_chart(runs, statuses)),
    ]


def _slug(text: str) -> str:
    return re.sub(r"[^0-9A-Za-z_-]+", "_", text)


def bwt_chart(runs: Sequence[RunData]) -> go.Figure:
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
            notes.append(
                f"{name}: no BWT. "
                + (
                    " ".join(why)
                    if why
                    else "No evaluation rounds with out-of-domain accuracy yet."
                )
            )
            continue
        texts = [
            f"step {int(r.step)}: "
            + change_text(
                r.bwt, r.bwt_low, r.bwt_high, unit="%", reason="too few items or no per-item scores"
            )
            for r in known.itertuples()
        ]
        error_y = _band_or_bars(
            fig, known, "bwt", "bwt_low", "bwt_high", color=styles[run.run_id]["color"], run=run
        )
        _line(fig, run, known["step"], known["bwt"], styles[run.run_id], texts, error_y)
        if len(known) == 1:
            notes.append(
                f"{name}: only step {int(known['step'].iloc[0])} so far; BWT needs a later round."
            )
        else:
            notes.append(f"{name}, {texts[-1]}.")
    fig.add_hline(y=0, line={"color": "#6b7280", "width": 1})
    _panel_layout(fig, "BWT: out-of-domain change", "step", "BWT, %", "higher")
    return _finish(fig, notes, "No BWT to draw (see the note below).", panel=True)


def _drift_rows(run: RunData, task: str) -> pd.DataFrame:
    frame = run.changes()
    if frame.empty:
        return frame
    return frame[(frame["task"] == task) & (frame["metric"] == DRIFT_METRIC)]


def drift_chart(runs: Sequence[RunData], task: str = OOD_DRIFT) -> go.Figure:
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
            notes.append(
                f"{name}: no {probe_noun(task)} measured (its rounds were evaluated "
                "before drift was measured, or without this probe)."
            )
            continue
        rows = rows.sort_values("step")
        base_step = int(rows["base_step"].iloc[0])
        known = rows[[finite(v) for v in rows["delta"]]]
        if rows["step"].max() == base_step:
            notes.append(
                f"{name}: only step {base_step} evaluated so far (the base model: no "
                "drift by definition); drift needs a later round."
            )
            continue
        if known.empty:
            notes.append(f"{name}: {rows['reason'].iloc[-1] or 'not scored'}.")
            continue
        texts = [
            f"step {int(r.step)}: KL "
            + (
                value_text(r.delta, r.low, r.high, "nats")
                if finite(r.low) and finite(r.high)
                else f"{float(r.delta):.3f} nats ({r.reason or 'no interval'})"
            )
            for r in known.itertuples()
        ]
        bounded = [
            finite(lo) and finite(hi) for lo, hi in zip(known["low"], known["high"], strict=True)
        ]
        after = known[known["step"] > base_step]
        error_y = None
        if len(after) >= 2:
            band = known[bounded]
            if len(band) >= 2:
                _band(
                    fig,
                    band["step"],
                    band["low"],
                    band["high"],
                    color=styles[run.run_id]["color"],
                    run=run,
                )
        elif len(after) == 1 and finite(after["low"].iloc[0]) and finite(after["high"].iloc[0]):
            last = after.index[0]  # the one round after step 0: an interval bar on its point
            error_y = {
                "type": "data",
                "symmetric": False,
                "thickness": 1.5,
                "width": 5,
                "array": [
                    float(r.high - r.delta) if r.Index == last else 0.0 for r in known.itertuples()
                ],
                "arrayminus": [
                    float(r.delta - r.low) if r.Index == last else 0.0 for r in known.itertuples()
                ],
            }
        _line(fig, run, known["step"], known["delta"], styles[run.run_id], texts, error_y)
        values += [float(v) for v in (*known["delta"], *known["low"], *known["high"]) if finite(v)]
        base = rows["base"].iloc[0]
        if finite(base) and float(base) > 0:
            notes.append(
                f"{name}: its first round (step {base_step}) already differs from the "
                "base model, so the line is the change of KL from that round."
            )
        notes.append(f"{name}, {texts[-1]}.")
    _panel_layout(fig, f"{title}: KL from the base model", "step", KL_AXIS)
    if values and min(values) >= 0:  # a KL: the axis starts at 0 (the base model)
        top = max(values)
        fig.update_yaxes(range=[0.0, 1.1 * top if top > 0 else 1.0], rangemode="tozero")
        fig.update_xaxes(rangemode="nonnegative")
    return _finish(fig, notes, f"No {probe_noun(task)} to show yet.", panel=True)


def drift_charts(runs: Sequence[RunData]) -> list[tuple[str, go.Figure]]:
    """(key, chart) of the two drift probes a reader looks at beside the target's change and
    BWT: OOD drift ("ood_drift") and target drift ("target_drift"), every run overlaid."""
    return [
        ("ood-drift", drift_chart(runs, OOD_DRIFT)),
        ("target-drift", drift_chart(runs, TARGET_DRIFT)),
    ]


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
