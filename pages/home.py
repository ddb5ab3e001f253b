"""Start page: what the tool does, what the app's own measurements show of the paper's claim
(read from the protocol results and the recorded CPU sweep, never written in here), the selected
model and data, the task catalogue."""

import pandas as pd
import streamlit as st

from components.jobs_view import backend_panel
from components.layout import fit_columns
from components.session import current_model, load_dataset_cached, sidebar_selection
from core.data.tasks import list_tasks
from core.errors import LensError
from core.fmt import count, num
from core.jobs.registry import JobRegistry
from core.model.loading import MODEL_SLOT, describe_model
from core.study.protocol import (
    ProtocolConfig,
    list_protocols,
    load_cpu_protocol,
    load_cpu_sweep,
    short_headline,
    sweep_verdict,
)

sel = sidebar_selection()

st.title("Perplexity Lens")
st.markdown(
    "Fine-tuning on ground-truth answers teaches a model the tokens it finds **surprising** "
    "(high perplexity). The Selective Token Masking paper (STM) argues that this is what makes "
    "it forget other skills, and that masking those tokens out of the loss keeps the gain with "
    "less forgetting. Perplexity Lens lets you see those tokens, tune the threshold, train, and "
    "**test that claim on your own model and machine**.\n\n"
    "1. **Explore** — token-perplexity heatmaps of ground-truth vs generated responses, and "
    "dataset analytics (the paper's Table 1).\n"
    "2. **Masking studio** — set τ or a target share, see exactly which tokens leave the loss, "
    "export the masked training set.\n"
    "3. **Generate data** — Self-Output and Rephrase training sets, checked by the task's "
    "verifier.\n"
    "4. **Train** — ground truth, STM, the random-mask control or generated data, as background "
    "jobs that survive a reload.\n"
    "5. **Runs** — live loss, target and out-of-domain charts; evaluate a model or an adapter.\n"
    "6. **Compare & report** — the runs table, the forgetting frontier, diagnostics and an "
    "offline HTML report.\n"
    "7. **Reproduce the paper** — every method × seeds as one job, with its table and findings."
)


def measured_here() -> None:
    """What this app has measured of the paper's claim: the newest protocol's headline on this
    machine (or that none has finished), and the recorded CPU sweep, read from their files."""
    st.subheader("What the app has measured so far")
    protocols = list_protocols()
    done = [p for p in protocols if p.results]
    running = [p for p in protocols if not p.results]
    if done:
        view = done[0]
        finished, planned = len(view.finished_runs()), len(view.planned_runs())
        st.markdown(
            f"**{view.name}** ({view.config.describe()}; {count(finished)} of {count(planned)} "
            "training runs finished), in short:"
        )
        for line in short_headline(view.results or {}):
            st.markdown(f"- {line}")
    else:
        st.markdown(
            "No protocol has finished on this machine yet, so the app has no measurement of "
            "its own of whether STM forgets less than ground truth here."
        )
    for view in running[:1]:
        st.caption(
            f"Running or unfinished: **{view.name}**, {count(len(view.finished_runs()))} of "
            f"{count(len(view.planned_runs()))} training runs finished."
        )
    recorded = load_cpu_protocol()
    if recorded is not None:
        config = ProtocolConfig.from_dict(recorded["config"])
        st.markdown(
            f"**Recorded on the project's machine** ({config.describe()}; {recorded['machine']}, "
            f"{recorded['date']}), in short:"
        )
        for line in short_headline(recorded):
            st.markdown(f"- {line}")
    sweep = load_cpu_sweep()
    if sweep is not None:
        st.markdown(
            f"**Ground truth alone on a CPU** ({sweep['model']}, {sweep['machine']}, "
            f"{sweep['date']}): {sweep_verdict(sweep['rows'])['text']}"
        )
    st.markdown(
        ":material/science: [Reproduce the paper](protocol): run the comparison, with every "
        "table and interval. Method and recorded numbers: `docs/BENCHMARKS.md`, section "
        '"Paper protocol".'
    )


measured_here()

left, right = st.columns(2)
with left:
    st.subheader("Model")
    lm = MODEL_SLOT.current
    if lm is None or lm.name != sel.model:
        st.caption(f"`{sel.model}` loads when first needed (Explore scores with it).")
        if st.button("Load now"):
            try:
                with st.spinner(f"Loading {sel.model}…"):
                    lm = current_model(sel)
            except LensError as exc:
                st.error(str(exc))
                lm = None
    if lm is not None and lm.name == sel.model:
        facts = describe_model(lm)
        facts["parameters"] = f"{num(facts['parameters'] / 1e6)} M"
        rows = [(k, str(v)) for k, v in facts.items()]
        st.table(pd.DataFrame(rows, columns=["", "value"]).set_index(""))
        for note in lm.warnings:
            st.warning(note)
with right:
    st.subheader("Data")
    try:
        dataset = load_dataset_cached(sel)
        st.success(dataset.report.summary())
        for note in dataset.report.warnings:
            st.warning(note)
    except LensError as exc:
        st.error(str(exc))

with st.expander("Where jobs run", icon=":material/dns:"):
    try:
        backend_panel(JobRegistry())
    except LensError as exc:  # e.g. a registry an older version wrote: one line, not the page
        st.error(str(exc))

st.subheader("Built-in tasks (offline)")
st.dataframe(
    pd.DataFrame(
        [
            {
                "task": s.name,
                "title": s.title,
                "splits": ", ".join(s.splits),
                "scorer": s.scorer,
                "MC format": f"{s.mc_format} (lm-eval {s.lm_eval_task})" if s.mc_format else "",
                "source": s.source,
                "licence": s.license,
            }
            for s in list_tasks()
        ]
    ),
    hide_index=True,
    width="stretch",
    column_order=["task", "title", "splits", "scorer", "MC format", "licence", "source"],
    column_config=fit_columns(
        ["task", "title", "splits", "scorer", "MC format", "licence", "source"],
        pin=["task"],
        widths={"title": 110, "splits": 110, "MC format": 180, "licence": 90, "source": "large"},
        help={"source": "where the offline copy comes from (hover a cell for all of it)"},
    ),
)
