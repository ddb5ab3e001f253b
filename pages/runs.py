"""Runs: live charts of loss, target-task and out-of-domain scores and BWT while runs train,
and a launcher for standalone evaluation jobs (the base model or a run's adapter on a suite)."""

import pandas as pd
import streamlit as st

from components.session import ensure_app_navigation
from core.errors import LensError
from core.eval.config import EvalConfig, eval_job_config, resolve_adapter_path
from core.eval.suites import SUITES, get_suite
from core.jobs.registry import JobRegistry
from core.jobs.runfiles import read_metrics, run_progress
from core.study.runs import RunView, list_runs, load_run
from core.viz.charts import plotly_config
from core.viz.run_charts import bwt_chart, loss_chart, metric_chart

ensure_app_navigation()
st.title("Runs")
st.caption(
    "Training loss, the target task and every out-of-domain task over steps (step 0 is the base "
    "model), and backward transfer (BWT). Charts follow running jobs live."
)

try:
    registry = JobRegistry()
    jobs = {job.id: job for job in registry.list()}
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
    current = {job.id: job for job in registry.list()}  # read again: the live fragment calls this
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
    figures = [("loss", loss_chart(runs))] if trained else []
    tasks: list[tuple[str, str, str]] = []
    for run in runs:
        frame = run.eval_frame()
        for task, metric, role in zip(frame["task"], frame["metric"], frame["role"], strict=True):
            if (task, metric, role) not in tasks:
                tasks.append((task, metric, role))
    tasks.sort(key=lambda t: (t[2] != "target", t[0]))
    for task, metric, role in tasks:
        fig = metric_chart(runs, task, metric)
        fig.update_layout(title=f"{task} {metric} ({'target' if role == 'target' else 'OOD'})")
        figures.append((f"{task}-{metric}", fig))
    if any(not run.summary_frame().empty for run in runs):
        figures.append(("bwt", bwt_chart(runs)))
    if len(figures) == int(trained):
        st.caption("No evaluation records yet: evaluation during training adds them.")
    cols = st.columns(2)
    for i, (name, fig) in enumerate(figures):
        fig.update_layout(uirevision=name)  # keep the user's zoom across refreshes
        with cols[i % 2]:
            st.plotly_chart(fig, key=f"runs-chart-{name}", config=plotly_config(f"run_{name}"))


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
