"""Self-contained HTML report of one or more runs, for stakeholders.

One file, no network: plotly.js is inlined once, charts stay interactive (each has the modebar's
PNG download, named after the chart), heatmap snapshots are static HTML, tables and configs are
plain HTML. It reuses the same chart and heatmap builders as the app (components/), which are
pure functions.

Heatmap snapshots: `heatmap_snapshots` scores the first N training examples of a run with the
original model and marks the tokens the run's mask rule drops; saved token-perplexity-change
results of the runs (core.study.diagnostics) add a Δ-perplexity heatmap per example.
"""

from __future__ import annotations

import datetime
import html
import json
import numbers
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from core import __version__, fmt
from core.data.records import ScoredExample
from core.errors import LensError
from core.eval.labels import OOD_DRIFT, TARGET_DRIFT
from core.io import write_text_atomic
from core.masking import DEFAULT_TAU
from core.masking.rules import compute_masks
from core.model.interface import LanguageModel
from core.scoring.cache import ScoreCache
from core.scoring.score import score_examples
from core.study.diagnostics import PplChange, saved_ppl_changes, training_examples
from core.study.report_config import DEFAULT_TITLE
from core.study.run_tables import (
    DRIFT_READING,
    drift_display_table,
    run_findings,
    runs_columns,
    runs_display_table,
    runs_table,
    score_columns,
)
from core.study.runs import RunView, drift_missing, drift_table, load_run
from core.training.config import TrainConfig
from core.viz.charts import plotly_config
from core.viz.compare_charts import (
    drift_frontier_chart,
    frontier_chart,
    ppl_change_histogram,
    score_vs_masked_chart,
)
from core.viz.heatmap import render_delta_heatmap, render_token_heatmap
from core.viz.run_charts import drift_charts, task_delta_charts, top_row_charts
from core.viz.run_style import figure_notes

MAX_SNAPSHOT_TOKENS = 600  # response tokens drawn per heatmap (keeps the file small)
MAX_DELTA_EXAMPLES = 8  # Δ-perplexity heatmaps per saved result

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:0;color:#1f2937;
background:#f8fafc}
main{max-width:1180px;margin:0 auto;padding:32px 28px 64px}
h1{font-size:28px;margin:0 0 4px}h2{font-size:20px;margin:36px 0 10px;border-bottom:1px solid
#e5e7eb;padding-bottom:6px}.sub{color:#6b7280;margin:0 0 18px}
table.runs{border-collapse:collapse;font-size:13px;background:#fff;width:100%}
table.runs th,table.runs td{border:1px solid #e5e7eb;padding:5px 8px;text-align:right}
table.runs th{background:#f1f5f9}table.runs td:first-child,table.runs td:nth-child(2),
table.runs td:nth-child(3){text-align:left}
.grid{display:grid;grid-template-columns:1fr 1fr;gap:16px}.grid3{display:grid;
grid-template-columns:1fr 1fr 1fr;gap:12px}.card{background:#fff;border:1px solid
#e5e7eb;border-radius:8px;padding:8px}
details{background:#fff;border:1px solid #e5e7eb;border-radius:6px;padding:6px 10px;margin:6px 0}
pre{font-size:12px;overflow:auto}.note{color:#6b7280;font-size:13px}.card .note{margin:4px 6px;
font-size:12px}ul.findings{font-size:14px;line-height:1.5}
"""


def _fmt(value: object) -> str:
    """A table cell as HTML text, by the rule every page uses (`core.fmt`): text as it is (a
    display table's cells are already `core.fmt` text), whole numbers as counts, other numbers
    as plain values, `fmt.MISSING` for unknowns."""
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return fmt.MISSING
    if isinstance(value, bool | str):
        return html.escape(str(value))
    if isinstance(value, numbers.Integral):
        return fmt.count(int(value))
    if isinstance(value, numbers.Real):
        return html.escape(fmt.num(float(value)))
    return html.escape(str(value))


def _table_html(table: pd.DataFrame, columns: Mapping[str, tuple[str, str]] | None = None) -> str:
    """A plain HTML table; `columns` (column -> (title, help text)) gives the headers the page
    shows, each with its help text as a tooltip."""
    heads = []
    for column in table.columns:
        title, tip = (columns or {}).get(column, (str(column), ""))
        attr = f' title="{html.escape(tip)}"' if tip else ""
        heads.append(f"<th{attr}>{html.escape(title)}</th>")
    body = "".join(
        "<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>"
        for row in table.itertuples(index=False)
    )
    return (
        f'<table class="runs"><thead><tr>{"".join(heads)}</tr></thead><tbody>{body}</tbody></table>'
    )


def ppl_change_stats(change: PplChange, tau: float) -> dict[str, str]:
    """A token-perplexity-change result's summary numbers as text (`core.fmt`), under the names
    the Compare page's cards and the report's table both use."""
    s = change.summary(tau)
    return {
        "examples": fmt.count(s["examples"]),
        "tokens": fmt.count(s["tokens"]),
        "mean Δ ln ppl": fmt.signed(s["mean_delta"], 3),
        "tokens more surprising": fmt.share(s["pct_harder"] / 100),
        f"mean Δ, base ppl ≤ {fmt.tau(tau)}": fmt.signed(s["mean_delta_easy"], 3),
        f"mean Δ, base ppl > {fmt.tau(tau)}": fmt.signed(s["mean_delta_hard"], 3),
        "sequence ppl before": fmt.num(s["seq_ppl_base"]),
        "sequence ppl after": fmt.num(s["seq_ppl_tuned"]),
    }


def chart_filename(fig: Any, fallback: str = "chart") -> str:
    """File name (no extension) of a chart's PNG download: its title as a slug."""
    title = getattr(getattr(fig.layout, "title", None), "text", None) or fallback
    slug = re.sub(r"[^0-9a-zA-Z]+", "_", title).strip("_").lower()
    return slug[:60] or fallback


def _draws(fig: Any) -> bool:
    """The figure has data (a chart builder's empty state draws only a message)."""
    return any(not (isinstance(t.meta, dict) and t.meta.get("role") == "band") for t in fig.data)


def _figure_html(fig: Any, first: bool, filename: str) -> str:
    return fig.to_html(
        full_html=False, include_plotlyjs=True if first else False, config=plotly_config(filename)
    )


@dataclass
class HeatmapSnapshot:
    """One example's token heatmap for the report: its scores, the run's mask (one bool per
    response token, None when nothing is masked) and the τ to underline."""

    example: ScoredExample
    masked: list[bool] | None = None
    tau: float | None = DEFAULT_TAU
    caption: str = ""


def run_tau(run: RunView) -> float:
    """The τ a run trained with (resolved from a target share when it used one), else 2.5."""
    tau = run.data_record.get("tau", run.config.get("tau"))
    return float(tau) if tau is not None else DEFAULT_TAU


def heatmap_snapshots(
    run: RunView,
    n: int,
    *,
    lm: LanguageModel | None = None,
    device: str = "auto",
    dtype: str = "auto",
    progress: Callable[[int, int], None] | None = None,
) -> list[HeatmapSnapshot]:
    """The first `n` training examples of `run`, scored by the original model (through the score
    cache), with the tokens the run's mask rule drops at its τ marked.

    The mask is recomputed on these examples with the run's own rule; for τ rules it is exactly
    the training mask (a token's fate depends only on its own perplexity). `lm` defaults to the
    run's model, loaded here.
    """
    if n < 1:
        return []
    examples = training_examples(run.config, n)
    if lm is None:
        from core.model.loading import load_model  # lazy: heavy (torch)

        lm = load_model(str(run.config.get("model") or "default"), device=device, dtype=dtype)
    scores = score_examples(lm, examples, cache=ScoreCache(), progress=progress).scores
    scored = scores.to_examples()  # one record per snapshot shown
    tau = run_tau(run)
    if run.method in ("gt", "base") or not scored:
        note = f"{run.label}: every response token trained; underlined: ppl > τ = {tau:g}"
        return [HeatmapSnapshot(ex, None, tau, note) for ex in scored]
    config = TrainConfig.from_dict(run.config).mask_config()
    if config.uses_tau and run.data_record.get("tau") is not None:
        config = replace(config, tau=tau, target_share=None)
    result = compute_masks(scores, config)
    note = f"{run.label}: struck-through tokens are masked by {result.config.describe()}"
    return [
        HeatmapSnapshot(ex, [bool(m) for m in mask], result.tau or tau, note)
        for ex, mask in zip(scored, result.masks, strict=True)
    ]


def _snapshot_html(snapshot: HeatmapSnapshot) -> str:
    heatmap = render_token_heatmap(
        snapshot.example, tau=snapshot.tau, masked=snapshot.masked, max_tokens=MAX_SNAPSHOT_TOKENS
    )
    caption = f"<p class='note'>{html.escape(snapshot.caption)}</p>" if snapshot.caption else ""
    return f"<div class='card'>{caption}{heatmap}</div>"


def _unique(name: str, taken: set[str]) -> str:
    """`name`, or `name_2`, `name_3`, ... when taken (so every PNG download has its own name)."""
    candidate, k = name, 1
    while candidate in taken:
        k += 1
        candidate = f"{name}_{k}"
    taken.add(candidate)
    return candidate


def _ppl_change_html(
    change: PplChange, run: RunView | None, first_chart: bool, taken: set[str]
) -> str:
    tau = run_tau(run) if run is not None else DEFAULT_TAU
    label = f"{run.label} · {change.run_id}" if run is not None else change.run_id
    stats = pd.DataFrame([ppl_change_stats(change, tau)])
    fig = ppl_change_histogram(change.frame(tau), tau)
    run_label = run.label if run is not None else change.run_id
    fig.update_layout(title={"text": f"Token perplexity change · {run_label} · {change.label}"})
    name = _unique(chart_filename(fig), taken)
    parts = [
        f"<h3>{html.escape(label)}: {html.escape(change.label)}</h3>",
        _table_html(stats),
        f"<div class='card'>{_figure_html(fig, first_chart, name)}</div>",
    ]
    for base, tuned in list(zip(change.base, change.tuned, strict=True))[:MAX_DELTA_EXAMPLES]:
        parts.append(f"<div class='card'>{render_delta_heatmap(base, tuned)}</div>")
    return "".join(parts)


def build_report(
    runs: Sequence[RunView],
    *,
    title: str = DEFAULT_TITLE,
    examples: Sequence[ScoredExample | HeatmapSnapshot] = (),
    ppl_changes: Sequence[PplChange] = (),
    notes: str = "",
    tables: Sequence[tuple[str, pd.DataFrame]] = (),
) -> str:
    """The report as one HTML string.

    `tables`: (heading, table) pairs shown before the runs table (e.g. the protocol summary).

    `examples`: heatmap snapshots (see `heatmap_snapshots`; a bare ScoredExample is drawn with
    τ = 2.5 and no mask). `ppl_changes`: token-perplexity-change results to show (see
    `core.study.diagnostics.saved_ppl_changes`).
    """
    if not runs:
        raise LensError("A report needs at least one run.")
    table = runs_table(list(runs))
    # the Runs page's charts, those with something drawn (the findings say what is missing)
    drift = drift_table(list(runs))
    sections: list[tuple[str, str, list[Any]]] = [
        ("Target, BWT and training loss", "grid3", [fig for _, fig in top_row_charts(runs)]),
        ("Drift from the base model", "grid", [fig for _, fig in drift_charts(runs)]),
        (
            "Each task: change vs step 0",
            "grid3",
            [fig for _, fig in task_delta_charts(runs, skip=(OOD_DRIFT, TARGET_DRIFT))],
        ),
    ]
    comparison = []
    if not drift.empty:
        comparison.append(drift_frontier_chart(table, drift, drift_missing(list(runs))))
    if any(run.final_summary is not None for run in runs):
        comparison.append(frontier_chart(table))
    if "masked %" in table.columns and table["masked %"].notna().sum() >= 2:
        comparison.append(score_vs_masked_chart(table, score_columns(table)))
    sections.append(("Comparison", "grid", comparison))
    sections = [(h, grid, [f for f in figs if _draws(f)]) for h, grid, figs in sections]
    figures = [fig for _, _, figs in sections for fig in figs]

    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body><main>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p class='sub'>Generated {stamp} by Perplexity Lens {__version__} · "
        f"{len(runs)} run(s)</p>",
    ]
    if notes:
        parts.append(f"<p>{html.escape(notes)}</p>")
    for heading, extra in tables:
        parts.append(f"<h2>{html.escape(heading)}</h2>" + _table_html(extra))
    shown = runs_display_table(table)
    parts.append("<h2>Runs</h2>" + _table_html(shown, runs_columns(shown)))
    parts.append(
        "<p class='note'>Every change compares a run's last evaluation with its step-0 "
        "evaluation of the base model under the same settings, with its paired 95% interval over "
        "evaluation items in brackets: target Δ in points (accuracy) or nats (the full-token "
        "reference NLL, lower is better); BWT is the mean relative change over the out-of-domain "
        "accuracy tasks above chance (Wu et al. 2025), TI the target's relative change (%). A "
        "change is better or worse only when its interval excludes zero.</p>"
    )
    if not drift.empty:
        parts.append(
            "<h2>Drift from the base model</h2>"
            + _table_html(drift_display_table(drift))
            + f"<p class='note'>{html.escape(DRIFT_READING)}</p>"
        )
    findings = [line for run in runs for line in run_findings(run)]
    parts.append(
        "<h2>Findings</h2><ul class='findings'>"
        + "".join(f"<li>{html.escape(line)}</li>" for line in findings)
        + "</ul>"
    )
    names: set[str] = set()
    drawn = 0
    for heading, grid, figs in sections:
        if not figs:
            continue
        parts.append(f"<h2>{html.escape(heading)}</h2><div class='{grid}'>")
        for fig in figs:
            drawn += 1
            name = _unique(chart_filename(fig, f"chart_{drawn}"), names)
            caption = "".join(f"<p class='note'>{html.escape(n)}</p>" for n in figure_notes(fig))
            parts.append(f"<div class='card'>{_figure_html(fig, drawn == 1, name)}{caption}</div>")
        parts.append("</div>")
    if examples:
        parts.append(
            "<h2>Token perplexity of selected examples</h2><p class='note'>Scored by the "
            "original model. Colour: token perplexity (log scale); underlined: above τ; struck "
            "through: masked out of the loss.</p>"
        )
        for item in examples:
            snapshot = item if isinstance(item, HeatmapSnapshot) else HeatmapSnapshot(item)
            parts.append(_snapshot_html(snapshot))
    if ppl_changes:
        by_id = {run.run_id: run for run in runs}
        parts.append(
            "<h2>Token perplexity change after fine-tuning</h2><p class='note'>The same "
            "examples scored by the original and the fine-tuned model; Δ = ln ppl after − ln ppl "
            "before (blue: the token became more expected, red: more surprising).</p>"
        )
        inlined = bool(figures)  # plotly.js goes in once, with the first chart
        for change in ppl_changes:
            parts.append(_ppl_change_html(change, by_id.get(change.run_id), not inlined, names))
            inlined = True
    parts.append("<h2>Configurations and data provenance</h2>")
    for run in runs:
        facts = {"config": run.config, "data": run.data_record, "summary": run.summary}
        parts.append(
            f"<details><summary>{html.escape(run.label)} · {html.escape(run.run_id)}</summary>"
            f"<pre>{html.escape(json.dumps(facts, indent=2, default=str))}</pre></details>"
        )
    parts.append("</main></body></html>")
    return "".join(parts)


def report_ppl_changes(runs: Sequence[RunView]) -> list[PplChange]:
    """Every saved token-perplexity-change result of `runs`, run by run."""
    return [change for run in runs for change in saved_ppl_changes(run.run_dir)]


def write_report(
    run_ids: Sequence[str | Path],
    out: str | Path,
    *,
    title: str = DEFAULT_TITLE,
    n_examples: int = 0,
    include_ppl_changes: bool = True,
    device: str = "auto",
    dtype: str = "auto",
    notes: str = "",
    tables: Sequence[tuple[str, pd.DataFrame]] = (),
) -> Path:
    """Build the report of the named runs and write it atomically to `out`.

    `n_examples` > 0 adds heatmap snapshots of the first run's first N training examples (this
    loads its model); `include_ppl_changes` adds every saved token-perplexity-change result of
    the runs.
    """
    runs = [load_run(r) for r in run_ids]
    text = build_report(
        runs,
        title=title,
        examples=heatmap_snapshots(runs[0], n_examples, device=device, dtype=dtype)
        if runs and n_examples
        else (),
        ppl_changes=report_ppl_changes(runs) if include_ppl_changes else (),
        notes=notes,
        tables=tables,
    )
    return write_text_atomic(out, text)
