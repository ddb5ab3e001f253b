"""Compare runs and present findings: runs table, the drift frontier (target gain vs OOD drift
from the base model) beside the forgetting frontier, score vs % masked, config diff, a τ-sweep
launcher, post-training diagnostics and the HTML report."""

import hashlib
import json
from collections import Counter
from typing import Any

import pandas as pd
import streamlit as st

from components.jobs_view import old_results_note
from components.session import (
    background_result,
    background_runner,
    ensure_app_navigation,
)
from core import fmt
from core.config import parse_list
from core.data.records import Example
from core.errors import LensError
from core.jobs.background import BackgroundTask
from core.jobs.registry import JobRegistry
from core.masking import DEFAULT_TAU
from core.study.diagnostics import (
    PplChange,
    compute_ppl_change,
    final_model_dir,
    load_ppl_change,
    lora_weight_stats,
    ppl_change_key,
    ppl_change_path,
    saved_ppl_changes,
    training_examples,
)
from core.study.report import (
    build_report,
    heatmap_snapshots,
    ppl_change_stats,
    report_ppl_changes,
    run_tau,
)
from core.study.runs import (
    FINISHED,
    NOT_APPLICABLE,
    PINNED_COLUMNS,
    RunView,
    drift_missing,
    drift_table,
    list_runs,
    run_findings,
    run_statuses,
    runs_columns,
    runs_display_table,
    runs_table,
    score_columns,
)
from core.study.sweep import SweepConfig, submit_sweep
from core.viz.charts import plotly_config
from core.viz.heatmap import render_delta_heatmap
from core.viz.run_charts import (
    LORA_COLUMNS,
    drift_frontier_chart,
    figure_notes,
    frontier_chart,
    lora_chart,
    ppl_change_histogram,
    score_vs_masked_chart,
)

MAX_PPL_EXAMPLES = 8


@st.cache_data(show_spinner="Loading examples…", max_entries=64)
def load_examples(config_json: str, source: str, task: str, split: str, n: int) -> list[Example]:
    """The first `n` training examples of a run (its config) or of a built-in task's split."""
    if source == "train":
        return training_examples(json.loads(config_json), n)
    from core.data.tasks import load_task

    return list(load_task(task, split=split, limit=n).examples)


@st.cache_data(show_spinner="Reading the adapter…", max_entries=16)
def cached_lora_stats(adapter: str, modified: float) -> pd.DataFrame:
    """`lora_weight_stats` of an adapter folder, read again only when its weights change."""
    return lora_weight_stats(adapter)


def show_ppl_change(change: PplChange, tau: float) -> None:
    """Summary numbers, the Δ histogram and one Δ heatmap per example."""
    s = change.summary(tau)
    text = ppl_change_stats(change, tau)
    c1, c2, c3, c4 = st.columns(4)
    c1.metric("Mean Δ ln ppl", text["mean Δ ln ppl"], help="ln ppl after − ln ppl before")
    c2.metric("Tokens more surprising", text["tokens more surprising"], help="Δ ln ppl > 0")
    c3.metric(
        "Sequence ppl before → after",
        f"{text['sequence ppl before']} → {text['sequence ppl after']}",
    )
    c4.metric(f"Tokens ({text['examples']} examples)", text["tokens"])
    st.caption(
        f"Mean Δ ln ppl on tokens the original model found easy (ppl ≤ {fmt.tau(tau)}): "
        f"{fmt.signed(s['mean_delta_easy'], 3)}; on surprising ones (ppl > {fmt.tau(tau)}): "
        f"{fmt.signed(s['mean_delta_hard'], 3)}. {change.label} · computed "
        f"{change.settings.get('created')} ({change.settings.get('dtype')}, "
        f"{change.settings.get('device')})."
    )
    st.plotly_chart(
        ppl_change_histogram(change.frame(tau), tau), config=plotly_config("ppl_change_histogram")
    )
    for i, (base, tuned) in enumerate(zip(change.base, change.tuned, strict=True)):
        with st.expander(f"{base.id}", expanded=i == 0):
            st.html(render_delta_heatmap(base, tuned))


def _url_choice(name: str, options: list[str], default: str) -> int:
    value = st.query_params.get(name, default)
    return options.index(value) if value in options else options.index(default)


def ppl_change_section(run: RunView) -> None:
    """Pick examples, compute (in the background, saved in the run folder) and show the token
    perplexity change from the original to the run's fine-tuned model."""
    st.markdown(
        "The same examples scored by the original model and by this run's fine-tuned model: "
        "blue tokens became more expected, red ones more surprising. Forgetting shows up as red "
        "on out-of-domain examples."
    )
    if final_model_dir(run.run_dir) is None:
        st.info(
            f"Run {run.run_id} has no saved final model yet (adapter/): it appears here once "
            "training has finished."
        )
        return
    tau = run_tau(run)
    saved = saved_ppl_changes(run.run_dir)
    sources = {"train": "Training examples", "task": "Out-of-domain task"}
    c1, c2, c3, c4 = st.columns([2, 1, 2, 1])
    source = c1.radio(
        "Examples",
        list(sources),
        format_func=sources.get,
        horizontal=True,
        index=_url_choice("dsrc", list(sources), "train"),
        key="ppl-src",
    )
    wanted_n = st.query_params.get("dn", "4")
    wanted_n = min(max(int(wanted_n), 1), MAX_PPL_EXAMPLES) if wanted_n.isdigit() else 4
    n = int(c2.number_input("How many", 1, MAX_PPL_EXAMPLES, wanted_n, key="ppl-n"))
    task, split = "", ""
    if source == "task":
        from core.data.tasks import list_tasks

        specs = {spec.name: spec for spec in list_tasks()}
        names = list(specs)
        default = "gsm8k" if "gsm8k" in names else names[0]
        task = c3.selectbox(
            "Task",
            names,
            index=_url_choice("dtask", names, default),
            format_func=lambda name: specs[name].title,
            key="ppl-task",
        )
        splits = list(specs[task].splits)
        split = c4.selectbox(
            "Split", splits, index=_url_choice("dsplit", splits, splits[-1]), key="ppl-split"
        )
    st.query_params.update({"dsrc": source, "dn": str(n), "dtask": task, "dsplit": split})
    try:
        examples = load_examples(json.dumps(run.config, sort_keys=True), source, task, split, n)
        key = ppl_change_key(run.run_dir, examples)
    except LensError as exc:
        st.error(str(exc))
        return
    label = (
        f"{len(examples)} training examples"
        if source == "train"
        else f"{len(examples)} examples of {task} / {split}"
    )
    change = load_ppl_change(ppl_change_path(run.run_dir, key))
    task_key = f"ppl-change:{run.run_id}:{key}"
    if change is None and background_runner().get(task_key) is None:
        st.caption(f"Not computed yet for these {len(examples)} examples.")
        if st.button(
            "Compute token perplexity change",
            type="primary",
            key="ppl-compute",
            help="Loads the original and the fine-tuned model in the background (this page "
            "stays usable; a reload re-attaches). The result is saved in the run folder.",
        ):

            def work(bg: BackgroundTask) -> PplChange:
                def status(message: str) -> None:
                    bg.message = message

                return compute_ppl_change(
                    run.run_dir, examples, label=label, status=status, progress=bg.progress
                )

            background_runner().start(task_key, f"Token perplexity change · {run.run_id}", work)
            st.rerun()
    elif change is None:
        change = background_result(task_key, f"Token perplexity change · {run.run_id}", None)
    if change is not None:
        show_ppl_change(change, tau)
    others = [c for c in saved if change is None or c.path != change.path]
    if others:
        with st.expander(f"Earlier results of this run ({len(others)})"):
            names = {str(c.path): f"{c.label} · {c.settings.get('created', '')}" for c in others}
            pick = st.selectbox("Result", list(names), format_func=names.get, key="ppl-saved")
            show_ppl_change(next(c for c in others if str(c.path) == pick), tau)


LORA_TABLE_COLUMNS = {
    "module": st.column_config.TextColumn(
        "Module", help="The adapted weight matrix, by its name in the model.", pinned=True
    ),
    "layer": st.column_config.TextColumn("Layer", help="Transformer layer (0 = first)."),
    "kind": st.column_config.TextColumn("Kind", help="Which projection of the layer."),
    "rank": st.column_config.TextColumn("LoRA rank r", help="Rank of the adapter's A·B."),
    "fro_norm": st.column_config.TextColumn(
        LORA_COLUMNS["fro_norm"],
        help="Frobenius norm of the weight change ΔW = s·B·A: how much "
        "fine-tuning moved this matrix.",
    ),
    "effective_rank": st.column_config.TextColumn(
        LORA_COLUMNS["effective_rank"],
        help="exp of the entropy of ΔW's normalised singular "
        "values: in how many directions it moved (at most r).",
    ),
}


def lora_display_table(stats: pd.DataFrame) -> pd.DataFrame:
    """`lora_weight_stats` with its numbers as `core.fmt` text."""
    out = stats.astype(object).copy()
    for column in ("layer", "rank"):
        out[column] = [fmt.count(v) if v >= 0 else fmt.MISSING for v in stats[column]]
    for column in ("fro_norm", "effective_rank"):
        out[column] = [fmt.num(float(v)) for v in stats[column]]
    return out


def runs_column_config(table: pd.DataFrame) -> dict[str, Any]:
    """Every column of a `runs_display_table` under its readable title with its help text; the
    run's id and setup pinned, so they stay in view when a wide table scrolls sideways."""
    return {
        column: st.column_config.TextColumn(title, help=tip, pinned=column in PINNED_COLUMNS)
        for column, (title, tip) in runs_columns(table).items()
    }


def findings_markdown(runs: list[RunView]) -> str:
    """Each run's findings as a list under the run's name."""
    lines = []
    for run in runs:
        name = f"{run.label} · {run.run_id}"
        lines.append(f"- **{name}**")
        for line in run_findings(run):
            lines.append(f"    - {line.removeprefix(f'{name}: ')}")
    return "\n".join(lines)


def compare_runs(runs: list[RunView], statuses: dict[str, str] | None) -> None:
    """Findings first, then the two frontiers, then the runs table and score vs % masked."""
    table = runs_table(runs, statuses)
    st.subheader("Findings")
    st.markdown(findings_markdown(runs))
    left, right = st.columns(2)
    with left:
        drift = drift_frontier_chart(table, drift_table(runs), drift_missing(runs))
        st.plotly_chart(drift, config=plotly_config("drift_frontier"), key="compare-drift-frontier")
        notes = figure_notes(drift)
        st.caption(
            "Target gain against drift from the base model: token KL on mixed out-of-domain "
            "prompts at each run's latest round, with 95% intervals both ways. Low drift with "
            "a target gain is the aim." + ("  \n" + "  \n".join(notes) if notes else "")
        )
    with right:
        frontier = frontier_chart(table)
        st.plotly_chart(frontier, config=plotly_config("frontier"), key="compare-frontier")
        notes = figure_notes(frontier)
        if notes:
            st.caption("  \n".join(notes))
    st.subheader("Runs")
    shown_table = runs_display_table(table)
    st.dataframe(
        shown_table,
        hide_index=True,
        width="stretch",
        column_config=runs_column_config(shown_table),
    )
    st.caption(
        "Each change is against the run's own step 0 (the base model), with its paired 95% "
        "interval over evaluation items in brackets: target Δ in points (accuracy) or nats "
        "(full-token reference NLL, lower is better); BWT and TI in %. "
        f"{NOT_APPLICABLE}: does not apply to the run's method; {fmt.MISSING}: not measured. "
        "Hover a column's title for what it means."
    )
    left, _ = st.columns(2)
    with left:
        st.plotly_chart(
            score_vs_masked_chart(table, score_columns(table)),
            config=plotly_config("score_vs_masked"),
        )


def config_diff(labels: dict[str, str]) -> None:
    """The settings in which two runs' configurations differ."""
    st.subheader("Config diff")
    c1, c2 = st.columns(2)
    a = c1.selectbox("Run A", list(labels), format_func=labels.get, key="diff-a")
    b = c2.selectbox("Run B", list(labels), index=1, format_func=labels.get, key="diff-b")
    ca, cb = by_id[a].config, by_id[b].config

    def text(value: Any) -> str:
        return fmt.MISSING if value is None else json.dumps(value, ensure_ascii=False)

    diff = [
        {"setting": k, "A": text(ca.get(k)), "B": text(cb.get(k))}
        for k in sorted(set(ca) | set(cb))
        if ca.get(k) != cb.get(k)
    ]
    if not diff:
        st.caption("The two configurations are identical.")
        return
    st.dataframe(
        pd.DataFrame(diff),
        hide_index=True,
        width="stretch",
        column_config={
            "setting": st.column_config.TextColumn(
                "Setting", help="A configuration field whose value differs.", pinned=True
            ),
            "A": st.column_config.TextColumn(
                f"Run A · {a}", help=f"Run A's value, as saved ({fmt.MISSING}: not set)."
            ),
            "B": st.column_config.TextColumn(
                f"Run B · {b}", help=f"Run B's value, as saved ({fmt.MISSING}: not set)."
            ),
        },
    )


ensure_app_navigation()
st.title("Compare runs")

try:
    available = list_runs()
    statuses = run_statuses(available)
except LensError as exc:
    st.error(str(exc))
    st.stop()

by_id = {run.run_id: run for run in available}
labels = {run.run_id: f"{run.label} · {run.run_id}" for run in available}
wanted = [r for r in st.query_params.get("cmp", "").split(",") if r in by_id]
unfinished = Counter(statuses[r.run_id] for r in available if statuses[r.run_id] != FINISHED)
hidden = ", ".join(f"{n} {status}" for status, n in sorted(unfinished.items()))
if available:
    # a link that names unfinished runs opens with them shown
    linked = st.query_params.get("all") == "1" or any(statuses[r] != FINISHED for r in wanted)
    show_all = st.toggle(
        "Include running, failed and cancelled runs",
        value=linked,
        key="cmp-all",
        help="Off: Compare and the report offer finished runs only. On: every run, its status "
        "in its name and in the table's Status column.",
    )
    st.query_params["all"] = "1" if show_all else "0"
    n_finished = len(available) - sum(unfinished.values())
    if unfinished and not show_all:
        st.caption(f"{fmt.count(n_finished)} finished runs; not shown: {hidden}.")
    elif unfinished:
        st.caption(f"{fmt.count(n_finished)} finished runs and {hidden}.")
else:
    show_all = False
shown = {
    r: label + ("" if statuses[r] == FINISHED else f" ({statuses[r]})")
    for r, label in labels.items()
    if show_all or statuses[r] == FINISHED
}

tab_compare, tab_sweep, tab_diag, tab_report = st.tabs(
    ["Compare", "τ sweep", "Diagnostics", "Report"]
)

with tab_sweep:
    st.markdown(
        "Queue one training run per τ, plus the controls, with the same data, preset and seed. "
        "Jobs run one after another in the background (they continue with the browser closed)."
    )
    with st.form("sweep"):
        c1, c2, c3 = st.columns(3)
        preset = c1.selectbox("Preset", ["cpu-quick", "paper"])
        task = c2.text_input("Task", "mbpp")
        limit = int(c3.number_input("Examples (0 = all)", 0, 100000, 64))
        taus_text = st.text_input("τ values", "1.5, 2, 2.5, 3, 10")
        c4, c5, c6 = st.columns(3)
        with_gt = c4.checkbox("Ground truth (no mask)", True)
        with_random = c5.checkbox(f"Random-mask control at τ = {DEFAULT_TAU:g}", True)
        seed = int(c6.number_input("Seed", 0, 10_000, 0))
        eval_every = int(st.number_input("Evaluate every N steps (0 = off)", 0, 10_000, 0))
        submitted = st.form_submit_button("Queue sweep", type="primary")
    if submitted:
        try:
            sweep = SweepConfig(
                train_preset=preset,
                task=task.strip(),
                limit=limit or None,
                taus=parse_list(float)(taus_text.replace(";", ",").replace(" ", "")),
                ground_truth=with_gt,
                random_control=with_random,
                seeds=[seed],
                eval_every=eval_every or None,
            )
            queued = submit_sweep(sweep, JobRegistry())
            st.success(
                f"Queued {len(queued)} jobs: {', '.join(j.id for j in queued)}. "
                "Follow them on Runs."
            )
            st.caption("The same from a terminal:")
            st.code(sweep.command(), language="bash")
        except LensError as exc:
            st.error(str(exc))

if not available:
    with tab_compare:
        st.info("No runs yet. Train on the **Train** page or queue a τ sweep.")
    st.stop()

with tab_compare:
    if not shown:
        st.info(
            f"No finished runs yet ({hidden}). Turn on **Include running, failed and cancelled "
            "runs** above to compare them as they are."
        )
    else:
        default = [r for r in wanted if r in shown] or list(shown)[:6]
        chosen = st.multiselect("Runs", list(shown), default=default, format_func=shown.get)
        st.query_params["cmp"] = ",".join(chosen)
        runs = [by_id[r] for r in chosen]
        old_results_note(runs)
        if runs:
            compare_runs(runs, statuses if show_all else None)
        if len(shown) >= 2:
            config_diff(shown)

with tab_diag:
    st.markdown(
        "Size and effective rank of the LoRA weight change per layer: how much, and in how "
        "many directions, fine-tuning moved each adapted matrix."
    )
    run_ids = list(labels)
    run_id = st.selectbox(
        "Run",
        run_ids,
        format_func=labels.get,
        key="diag-run",
        index=_url_choice("drun", run_ids, run_ids[0]),
    )
    st.query_params["drun"] = run_id
    adapter = by_id[run_id].run_dir / "adapter"
    weights = adapter / "adapter_model.safetensors"
    try:
        stats = cached_lora_stats(str(adapter), weights.stat().st_mtime if weights.exists() else 0)
    except LensError as exc:
        st.info(str(exc))
    else:
        for column in LORA_COLUMNS:
            st.plotly_chart(lora_chart(stats, column), config=plotly_config(f"lora_{column}"))
        st.dataframe(
            lora_display_table(stats),
            hide_index=True,
            width="stretch",
            column_config=LORA_TABLE_COLUMNS,
        )
    st.subheader("Token perplexity change")
    ppl_change_section(by_id[run_id])

with tab_report:
    chosen_report = st.multiselect(
        "Runs in the report",
        list(shown),
        default=list(shown)[:6],
        format_func=shown.get,
        key="report-runs",
        help="Finished runs, unless the toggle above includes the others.",
    )
    title = st.text_input("Title", "Perplexity Lens: fine-tuning with selective token masking")
    c1, c2 = st.columns(2)
    n_snapshots = int(
        c1.number_input(
            "Heatmap snapshots",
            0,
            MAX_PPL_EXAMPLES,
            3,
            key="report-snapshots",
            help="The first N training examples of the first run, scored by the original model, "
            "with the tokens its mask drops struck through (loads the model).",
        )
    )
    with_changes = c2.checkbox(
        "Include saved token perplexity changes",
        True,
        key="report-ppl",
        help="Results computed on the Diagnostics tab.",
    )
    if st.button("Build report", type="primary", disabled=not chosen_report):
        runs_in_report = [by_id[r] for r in chosen_report]
        request = json.dumps([chosen_report, title, n_snapshots, with_changes])
        key = "report:" + hashlib.sha256(request.encode()).hexdigest()[:16]

        def build(bg: BackgroundTask) -> str:
            bg.message = "scoring the heatmap snapshots" if n_snapshots else "building"
            snapshots = heatmap_snapshots(runs_in_report[0], n_snapshots, progress=bg.progress)
            bg.message = "building"
            changes = report_ppl_changes(runs_in_report) if with_changes else []
            return build_report(
                runs_in_report, title=title, examples=snapshots, ppl_changes=changes
            )

        background_runner().start(key, "Building the report", build, restart=True)
        st.session_state["report_key"] = key
    if "report_key" in st.session_state:
        try:
            html = background_result(st.session_state["report_key"], "Building the report", None)
        except LensError as exc:
            st.error(str(exc))
            html = None
        if html:
            st.success(f"Report ready ({len(html) / 1e6:.1f} MB, self-contained, works offline).")
            st.download_button(
                "Download report.html",
                html,
                file_name="perplexity_lens_report.html",
                mime="text/html",
            )
