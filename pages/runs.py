"""Runs: while runs train, the target's change vs step 0, BWT, drift from the base model (OOD and
target probes) and the training loss (every run overlaid, each with its paired 95% interval),
the latest round's drift in a table, then each task's change, then any raw metric through one
picker; an evaluation round in progress as a progress bar; and a launcher for standalone
evaluation jobs (the base model or a run's adapter on a suite)."""

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from components.jobs_view import current_state, old_results_note, state_bar
from components.session import ensure_app_navigation
from core.errors import LensError
from core.eval.config import EvalConfig, eval_job_config, resolve_adapter_path
from core.eval.drift import DRIFT_LABELS
from core.eval.suites import SUITES, get_suite
from core.jobs.registry import JobRegistry, jobs_by_run
from core.jobs.runfiles import read_metrics, run_progress
from core.study.runs import (
    DRIFT_READING,
    SPLIT_COLUMN,
    RunView,
    drift_display_table,
    drift_notes,
    drift_table,
    list_runs,
    load_run,
)
from core.viz.charts import plotly_config
from core.viz.run_charts import (
    OOD_DRIFT,
    TARGET_DRIFT,
    drift_charts,
    figure_notes,
    metric_chart,
    metric_label,
    metric_options,
    no_loss_reason,
    task_delta_charts,
    top_row_charts,
)

ensure_app_navigation()
st.title("Runs")
st.caption(
    "The target's change from step 0 (the base model), backward transfer (BWT), drift from the "
    "base model (token KL on out-of-domain and on target prompts) and the training loss, then "
    "every task's change. Bands are paired 95% intervals over evaluation items: a change is "
    "better or worse only where its band excludes zero. Charts follow running jobs live."
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
        job, _ = registry.submit_once(
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
            "Model",
            "default",
            key="eval-model",
            help="'default' (the embedded model), a "
            "Hugging Face id, a local folder or a .gguf file",
        )
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


def _status_table(runs: list[RunView], current: dict) -> pd.DataFrame:
    """One row per run: its job's status and what it does now (its state line while it runs,
    else its last message), training step, last loss, rounds."""
    rows = []
    for run in runs:
        job = current.get(run.run_id)
        prog = run_progress(run.records)
        state = current_state(run.run_dir, job) if job is not None else None
        rows.append(
            {
                "run": run.run_id,
                "label": run.label,
                "status": job.status if job else "–",
                "now": state.line() if state is not None else (job.message if job else ""),
                "step": f"{prog.step}/{prog.max_steps}" if prog.max_steps else "–",
                "last loss": prog.last_loss,
                "eval rounds": int(run.eval_frame()["step"].nunique()),
            }
        )
    return pd.DataFrame(rows)


def labels_of(run: RunView) -> str:
    """A run as the page names it: "label · run id"."""
    return f"{run.label} · {run.run_id}"


def _job_kind(current: dict, run: RunView) -> str | None:
    """The kind of the run's job ("train", "eval", ...), None without one."""
    job = current.get(run.run_id)
    return job.kind if job else None


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
    old_results_note(runs)
    current = jobs_by_run(registry.list())  # read again: the live fragment calls this
    st.dataframe(_status_table(runs, current), hide_index=True, width="stretch")
    for run in runs:  # what each running job does now: phase, where in it, time left
        state_bar(run.run_dir, current.get(run.run_id), prefix=f"{labels_of(run)}: ")
    statuses = {r: job.status for r, job in current.items()}
    top = dict(top_row_charts(runs, statuses))
    panels = [
        ("target", top["target"]),
        ("bwt", top["bwt"]),
        *drift_charts(runs),
        ("loss", top["loss"]),
    ]
    trained = any(not run.train_frame().empty for run in runs)
    for i in range(0, len(panels), 3):
        for column, (name, fig) in zip(st.columns(3), panels[i : i + 3], strict=False):
            with column:
                if name == "loss" and not trained:  # no line to draw: say what each run is
                    st.caption(
                        "**Training loss**: none yet.  \n"
                        + "  \n".join(
                            f"{labels_of(run)}: "
                            + no_loss_reason(run, statuses.get(run.run_id), _job_kind(current, run))
                            for run in runs
                        )
                    )
                else:
                    _chart(name, fig)
    drift = drift_table(runs)
    st.markdown("**Drift from the base model at the latest round**")
    if drift.empty:
        st.caption("No drift measured after step 0 in these runs yet.")
    else:
        shown = drift_display_table(drift).rename(
            columns={
                DRIFT_LABELS["kl"]: "token KL, nats",
                DRIFT_LABELS["top1_agree"]: "top-1 agree",
                DRIFT_LABELS["dnll"]: "Δ NLL, nats/token",
                SPLIT_COLUMN: "KL toward / away",
            }
        )
        # a static table wraps its cells, so every column fits a 1280 px screen (a data grid
        # of these seven columns scrolled sideways there)
        st.table(shown.style.hide(axis="index"))
        st.caption(
            "Brackets: 95% intervals over probe items. KL toward / away: toward + away = KL, "
            "with the share toward the base's answers."
        )
        st.caption(DRIFT_READING)
    missing = drift_notes(runs)
    if missing:
        st.caption("No drift row: " + " ".join(missing))
    options = metric_options(runs)
    if not options:
        st.caption("No evaluation records yet: evaluation during training adds them.")
        return
    st.subheader("Each task: change vs step 0")
    if any(run.changes()["step"].nunique() > 1 for run in runs):
        per_task = task_delta_charts(runs, skip=(OOD_DRIFT, TARGET_DRIFT))  # drawn above
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
        "Task and metric",
        list(values),
        key="runs-metric",
        format_func=lambda v: (
            metric_label(values[v][0], values[v][1], sep=" · ")
            + f" ({'target' if values[v][2] == 'target' else 'OOD'})"
        ),
        help="Every metric the evaluation recorded, as measured (not a change): one chart for "
        "the one picked.",
    )
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
