"""Self-contained HTML report of one or more runs, for stakeholders.

One file, no network: plotly.js is inlined once, charts stay interactive (each has the modebar's
PNG download), heatmap snapshots are static HTML, tables and configs are plain HTML. It reuses the
same chart and heatmap builders as the app (components/), which are pure functions.
"""

from __future__ import annotations

import datetime
import html
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from core import __version__
from core.errors import LensError
from core.records import ScoredExample
from core.runs import RunView, load_run, runs_table

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
.grid{display:grid;grid-template-columns:1fr 1fr;gap:16px}.card{background:#fff;border:1px solid
#e5e7eb;border-radius:8px;padding:8px}
details{background:#fff;border:1px solid #e5e7eb;border-radius:6px;padding:6px 10px;margin:6px 0}
pre{font-size:12px;overflow:auto}.note{color:#6b7280;font-size:13px}
"""


def _fmt(value: object) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
    return html.escape(str(value))


def _table_html(table: pd.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in table.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>"
        for row in table.itertuples(index=False)
    )
    return f'<table class="runs"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _figure_html(fig: object, first: bool) -> str:
    from components.charts import plotly_config

    return fig.to_html(  # type: ignore[attr-defined]
        full_html=False, include_plotlyjs=True if first else False, config=plotly_config("report")
    )


def build_report(
    runs: Sequence[RunView],
    *,
    title: str = "Perplexity Lens report",
    examples: Sequence[ScoredExample] = (),
    notes: str = "",
) -> str:
    """The report as one HTML string."""
    from components.heatmap import render_token_heatmap
    from components.run_charts import (
        bwt_chart,
        frontier_chart,
        loss_chart,
        metric_chart,
        score_vs_masked_chart,
    )

    if not runs:
        raise LensError("A report needs at least one run.")
    table = runs_table(list(runs))
    figures = [loss_chart(runs)]
    tasks: list[tuple[str, str]] = []
    for run in runs:
        frame = run.eval_frame()
        for task, metric in zip(frame.get("task", []), frame.get("metric", []), strict=False):
            if (task, metric) not in tasks:
                tasks.append((task, metric))
    figures += [metric_chart(runs, task, metric) for task, metric in tasks]
    if any(not run.summary_frame().empty for run in runs):
        figures.append(bwt_chart(runs))
    if {"TI", "BWT"} <= set(table.columns) and table[["TI", "BWT"]].notna().all(axis=1).any():
        figures.append(frontier_chart(table))
    if "masked %" in table.columns and table["masked %"].notna().sum() >= 2:
        score_cols = [c for c in table.columns if " " in c and c.split(" ")[0] in dict(tasks)]
        figures.append(score_vs_masked_chart(table, score_cols))

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
    parts.append("<h2>Runs</h2>" + _table_html(table))
    parts.append(
        "<p class='note'>Target change (Δ%) and TI compare each run's last evaluation with its "
        "step-0 evaluation of the base model under the same settings; BWT is the mean relative "
        "change over the out-of-domain tasks (Wu et al. 2025).</p>"
    )
    parts.append("<h2>Charts</h2><div class='grid'>")
    for i, fig in enumerate(figures):
        parts.append(f"<div class='card'>{_figure_html(fig, first=i == 0)}</div>")
    parts.append("</div>")
    if examples:
        parts.append("<h2>Token perplexity of selected examples</h2>")
        for ex in examples:
            parts.append(f"<div class='card'>{render_token_heatmap(ex, tau=2.5)}</div>")
    parts.append("<h2>Configurations and data provenance</h2>")
    for run in runs:
        facts = {"config": run.config, "data": run.data_record, "summary": run.summary}
        parts.append(
            f"<details><summary>{html.escape(run.label)} · {html.escape(run.run_id)}</summary>"
            f"<pre>{html.escape(json.dumps(facts, indent=2, default=str))}</pre></details>"
        )
    parts.append("</main></body></html>")
    return "".join(parts)


def write_report(
    run_ids: Sequence[str | Path],
    out: str | Path,
    *,
    title: str = "Perplexity Lens report",
    examples: Sequence[ScoredExample] = (),
) -> Path:
    """Build the report of the named runs and write it atomically to `out`."""
    runs = [load_run(r) for r in run_ids]
    text = build_report(runs, title=title, examples=examples)
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target
