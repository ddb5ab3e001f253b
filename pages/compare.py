"""Compare runs and present findings: runs table, forgetting frontier, score vs % masked,
config diff, a τ-sweep launcher, post-training diagnostics and the HTML report."""

import json

import pandas as pd
import streamlit as st

from components.charts import plotly_config
from components.run_charts import frontier_chart, score_vs_masked_chart
from components.session import ensure_app_navigation
from core.diagnostics import lora_weight_stats
from core.errors import LensError
from core.jobs import JobRegistry
from core.report import build_report
from core.runs import list_runs, runs_table

ensure_app_navigation()
st.title("Compare runs")

try:
    available = list_runs()
except LensError as exc:
    st.error(str(exc))
    st.stop()

tab_compare, tab_sweep, tab_diag, tab_report = st.tabs(
    ["Compare", "τ sweep", "Diagnostics", "Report"]
)

labels = {run.run_id: f"{run.label} · {run.run_id}" for run in available}
by_id = {run.run_id: run for run in available}

with tab_sweep:
    st.markdown(
        "Queue one training run per τ, plus the controls, with the same data, preset and seed. "
        "Jobs run one after another in the background (they continue with the browser closed)."
    )
    from core.training import TrainConfig

    with st.form("sweep"):
        c1, c2, c3 = st.columns(3)
        preset = c1.selectbox("Preset", ["cpu-quick", "paper"])
        task = c2.text_input("Task", "mbpp")
        limit = int(c3.number_input("Examples (0 = all)", 0, 100000, 64))
        taus_text = st.text_input("τ values", "1.5, 2, 2.5, 3, 10")
        c4, c5, c6 = st.columns(3)
        with_gt = c4.checkbox("Ground truth (no mask)", True)
        with_random = c5.checkbox("Random-mask control at τ = 2.5", True)
        seed = int(c6.number_input("Seed", 0, 10_000, 0))
        eval_every = int(st.number_input("Evaluate every N steps (0 = off)", 0, 10_000, 0))
        submitted = st.form_submit_button("Queue sweep", type="primary")
    if submitted:
        try:
            taus = [float(t) for t in taus_text.replace(";", ",").split(",") if t.strip()]
            if any(t <= 0 for t in taus):
                raise ValueError
        except ValueError:
            st.error("τ values must be positive numbers separated by commas, e.g. 1.5, 2, 2.5.")
            taus = None
        if taus is not None:
            plans = [("gt", None)] if with_gt else []
            plans += [("stm", t) for t in taus]
            plans += [("random", 2.5)] if with_random else []
            registry = JobRegistry()
            queued = []
            try:
                for method, tau in plans:
                    overrides = {"task": task, "split": "train", "method": method, "seed": seed}
                    overrides["limit"] = limit or None
                    overrides["eval_every"] = eval_every or None
                    if tau is not None:
                        overrides["tau"] = tau
                    config = TrainConfig.from_preset(preset, **overrides)
                    job = registry.submit(
                        "train", config.to_dict(), device=config.device, label=config.describe()
                    )
                    queued.append(job.id)
                st.success(f"Queued {len(queued)} jobs: {', '.join(queued)}. Follow them on Runs.")
            except LensError as exc:
                st.error(str(exc))

if not available:
    with tab_compare:
        st.info("No runs yet. Train on the **Train** page or queue a τ sweep.")
    st.stop()

with tab_compare:
    wanted = [r for r in st.query_params.get("cmp", "").split(",") if r in labels]
    chosen = st.multiselect(
        "Runs", list(labels), default=wanted or list(labels)[:6], format_func=labels.get
    )
    st.query_params["cmp"] = ",".join(chosen)
    runs = [by_id[r] for r in chosen]
    if runs:
        table = runs_table(runs)
        st.dataframe(table, hide_index=True, width="stretch")
        left, right = st.columns(2)
        with left:
            st.plotly_chart(frontier_chart(table), config=plotly_config("frontier"))
        with right:
            score_cols = [
                c
                for c in table.columns
                if c not in ("run", "label", "method", "tau", "masked %", "target", "target Δ%")
                and c not in ("BWT", "TI", "prep s", "train s")
            ]
            st.plotly_chart(
                score_vs_masked_chart(table, score_cols), config=plotly_config("score_vs_masked")
            )
    st.subheader("Config diff")
    if len(labels) >= 2:
        c1, c2 = st.columns(2)
        a = c1.selectbox("Run A", list(labels), format_func=labels.get, key="diff-a")
        b = c2.selectbox("Run B", list(labels), index=1, format_func=labels.get, key="diff-b")
        ca, cb = by_id[a].config, by_id[b].config
        diff = [
            {"setting": k, "A": json.dumps(ca.get(k)), "B": json.dumps(cb.get(k))}
            for k in sorted(set(ca) | set(cb))
            if ca.get(k) != cb.get(k)
        ]
        if diff:
            st.dataframe(pd.DataFrame(diff), hide_index=True, width="stretch")
        else:
            st.caption("The two configurations are identical.")

with tab_diag:
    st.markdown(
        "Size and effective rank of the LoRA weight change per layer: how much, and in how "
        "many directions, fine-tuning moved each adapted matrix."
    )
    run_id = st.selectbox("Run", list(labels), format_func=labels.get, key="diag-run")
    adapter = by_id[run_id].run_dir / "adapter"
    try:
        stats = lora_weight_stats(adapter)
    except LensError as exc:
        st.info(str(exc))
    else:
        import plotly.express as px

        for column, title in (("fro_norm", "‖ΔW‖_F"), ("effective_rank", "effective rank")):
            fig = px.bar(
                stats, x="layer", y=column, color="kind", barmode="group",
                title=f"{title} per layer", template="plotly_white",
            )  # fmt: skip
            st.plotly_chart(fig, config=plotly_config(f"lora_{column}"))
        st.dataframe(stats, hide_index=True, width="stretch")

with tab_report:
    chosen_report = st.multiselect(
        "Runs in the report", list(labels), default=list(labels)[:6], format_func=labels.get,
        key="report-runs",
    )  # fmt: skip
    title = st.text_input("Title", "Perplexity Lens: fine-tuning with selective token masking")
    if st.button("Build report", type="primary", disabled=not chosen_report):
        try:
            html = build_report([by_id[r] for r in chosen_report], title=title)
        except LensError as exc:
            st.error(str(exc))
        else:
            st.session_state["report_html"] = html
    if "report_html" in st.session_state:
        html = st.session_state["report_html"]
        st.success(f"Report ready ({len(html) / 1e6:.1f} MB, self-contained, works offline).")
        st.download_button(
            "Download report.html", html, file_name="perplexity_lens_report.html",
            mime="text/html",
        )  # fmt: skip
