"""Runs: live charts of loss, target-task and out-of-domain scores and BWT while runs train."""

import pandas as pd
import streamlit as st

from components.charts import plotly_config
from components.run_charts import bwt_chart, loss_chart, metric_chart
from components.session import ensure_app_navigation
from core.errors import LensError
from core.jobs import JobRegistry, read_metrics, run_progress
from core.runs import RunView, list_runs, load_run

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
if not available:
    st.info("No runs yet. Start one on the **Train** page or with `python -m core train`.")
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
    rows = []
    for run in runs:
        job = jobs.get(run.run_id)
        prog = run_progress(run.records)
        rows.append(
            {
                "run": run.run_id,
                "label": run.label,
                "status": job.status if job else "–",
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
    figures = [("loss", loss_chart(runs))]
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
    if len(figures) == 1:
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
