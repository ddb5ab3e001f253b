"""Runs: while runs train, the target's change vs step 0, BWT and the training loss (every run
overlaid, each change with its paired 95% interval), then each task's change, then any raw
metric through one picker; and a launcher for standalone evaluation jobs (the base model or a
run's adapter on a suite)."""

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from components.session import ensure_app_navigation
from core.errors import LensError
from core.eval.config import EvalConfig, eval_job_config, resolve_adapter_path
from core.eval.suites import SUITES, get_suite
from core.jobs.registry import JobRegistry, jobs_by_run
from core.jobs.runfiles import read_metrics, run_progress
from core.study.runs import RunView, list_runs, load_run
from core.viz.charts import plotly_config
from core.viz.run_charts import (
    figure_notes,
    metric_chart,
    metric_options,
    task_delta_charts,
    top_row_charts,
)

ensure_app_navigation()
st.title("Runs")
st.caption(
    "The target's change from step 0 (the base model), backward transfer (BWT) and the training "
    "loss, then every task's change. Bands are paired 95% intervals over evaluation items: a "
    "change is better or worse only where its band excludes zero. Charts follow running jobs live."
)

try:
    registry = JobRegistry()
    jobs = jobs_by_run(registry.list())
    available = list_runs()
except LensError as exc:
    st.error(str(exc))
    st.stop()


def _has_adapter(run: RunView) -> bool:
    try:
        resolve_adapter_path(run.run_dir)
    except LensError:
        return False
    return True


def _start_eval(config: dict) -> None:
    """Queue the evaluation job and show its run (a callback: runs before the script)."""
    try:
        job = registry.submit(
            "eval", config, device=config["device"], label=EvalConfig.from_dict(config).describe()
        )
    except LensError as exc:
        st.session_state["eval_start_error"] = str(exc)
        return
    st.query_params["runs"] = job.id


with st.expander("Evaluate a model or a run's adapter", expanded=not available):
    adapters = {run.run_id: run for run in available if _has_adapter(run)}
    c1, c2, c3 = st.columns([2, 1, 1])
    target = c1.selectbox(
        "What to evaluate",
        ["", *adapters],
        format_func=lambda r: "base model only" if not r else f"{adapters[r].label} · {r}",
        key="eval-target",
        help="A run's adapter is evaluated against its base model (TI / BWT); the base model's "
        "scores are cached per model and suite.",
    )
    suite_name = c2.selectbox("Suite", list(SUITES), key="eval-suite")
    limit = c3.number_input(
        "At most N per task", min_value=1, value=None, placeholder="suite sizes", key="eval-limit"
    )
    if target:
        model = str(adapters[target].config.get("model") or "default")
        st.caption(f"Base model of this run: `{model}`")
    else:
        model = st.text_input(
            "Model", "default", key="eval-model", help="'default' (the embedded model), a "
            "Hugging Face id, a local folder or a .gguf file",
        )  # fmt: skip
    st.caption(get_suite(suite_name).description)
    extra = st.text_input(
        "Extra lm-evaluation-harness tasks (optional)",
        key="eval-lm-eval",
        placeholder="e.g. hellaswag, piqa",
        help="Run as out-of-domain tasks when the `lm-eval` package is installed and the task's "
        "data is reachable; otherwise the results say why they were skipped.",
    )
    try:
        eval_config = eval_job_config(
            model.strip(),
            adapter=target or None,
            suite=suite_name,
            limit=limit,
            lm_eval_tasks=extra.replace(",", " ").split(),
        )
    except LensError as exc:
        st.error(str(exc))
    else:
        st.caption("Equivalent command (runs in the foreground; add `--submit` to queue it):")
        st.code(EvalConfig.from_dict(eval_config).command(), language="bash", wrap_lines=True)
        st.button(
            "Start evaluation",
            type="primary",
            icon=":material/play_arrow:",
            on_click=_start_eval,
            args=(eval_config,),
            key="eval-start",
        )
    if st.session_state.get("eval_start_error"):
        st.error(st.session_state.pop("eval_start_error"))

if not available:
    st.info(
        "No runs yet. Start one on the **Train** page or with `python -m core train`, or "
        "evaluate the base model above."
    )
    st.stop()

labels = {run.run_id: f"{run.label} · {run.run_id}" for run in available}
wanted = [r for r in st.query_params.get("runs", "").split(",") if r in labels]
if not wanted:
    running = [r for r, job in jobs.items() if job.active and r in labels]
    wanted = running or list(labels)[:4]
chosen = st.multiselect("Runs", list(labels), default=wanted, format_func=labels.get)
st.query_params["runs"] = ",".join(chosen)
paused = st.toggle("Pause live updates", value=False)


def _status_table(runs: list[RunView]) -> pd.DataFrame:
    current = jobs_by_run(registry.list())  # read again: the live fragment calls this
    rows = []
    for run in runs:
        job = current.get(run.run_id)
        prog = run_progress(run.records)
        rows.append(
            {
                "run": run.run_id,
                "label": run.label,
                "status": job.status if job else "–",
                "message": job.message if job else "",
                "step": f"{prog.step}/{prog.max_steps}" if prog.max_steps else "–",
                "last loss": prog.last_loss,
                "eval rounds": int(run.eval_frame()["step"].nunique()),
            }
        )
    return pd.DataFrame(rows)


def _chart(name: str, fig: go.Figure) -> None:
    """One chart under a stable key (`runs-chart-<name>`), then its notes as a caption."""
    fig.update_layout(uirevision=name)  # keep the user's zoom across refreshes
    st.plotly_chart(fig, key=f"runs-chart-{name}", config=plotly_config(f"run_{name}"))
    notes = figure_notes(fig)
    if notes:
        st.caption("  \n".join(notes))


def _draw() -> None:
    runs = []
    for run_id in chosen:
        try:
            runs.append(load_run(run_id))
        except LensError as exc:
            st.warning(str(exc))
    if not runs:
        st.info("Pick one or more runs.")
        return
    st.dataframe(_status_table(runs), hide_index=True, width="stretch")
    trained = any(not run.train_frame().empty for run in runs)  # evaluation jobs have no loss
    for column, (name, fig) in zip(st.columns(3), top_row_charts(runs), strict=True):
        with column:
            if name == "loss" and not trained:
                st.caption("**Training loss**: none, these are evaluation-only runs.")
            else:
                _chart(name, fig)
    options = metric_options(runs)
    if not options:
        st.caption("No evaluation records yet: evaluation during training adds them.")
        return
    st.subheader("Each task: change vs step 0")
    if any(run.changes()["step"].nunique() > 1 for run in runs):
        per_task = task_delta_charts(runs)
        for i in range(0, len(per_task), 3):
            for column, (name, fig) in zip(st.columns(3), per_task[i : i + 3], strict=False):
                with column:
                    _chart(name, fig)
    else:
        st.caption(
            "Only step 0 (the base model) is evaluated so far: each task's change appears after "
            "a later round. The raw scores are below."
        )
    st.subheader("Raw values")
    values = {f"{task}|{metric}": (task, metric, role) for task, metric, role in options}
    pick = st.selectbox(
        "Task and metric", list(values), key="runs-metric",
        format_func=lambda v: f"{values[v][0]} · {values[v][1]} "
        f"({'target' if values[v][2] == 'target' else 'OOD'})",
        help="Every metric the evaluation recorded, as measured (not a change): one chart for "
        "the one picked.",
    )  # fmt: skip
    task, metric, _ = values[pick]
    _chart("metric", metric_chart(runs, task, metric))


any_active = any(jobs[r].active for r in chosen if r in jobs)
if paused or not any_active:
    _draw()
else:

    @st.fragment(run_every=3.0)
    def _live() -> None:
        _draw()

    _live()

with st.expander("Metrics records (raw)"):
    if chosen:
        run_id = st.selectbox("Run", chosen, format_func=labels.get, key="raw-run")
        records = read_metrics(load_run(run_id).run_dir)
        st.dataframe(pd.DataFrame(records).tail(200), hide_index=True, width="stretch")
