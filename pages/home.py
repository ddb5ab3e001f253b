"""Start page: what the tool does, the selected model and data, the task catalogue."""

import pandas as pd
import streamlit as st

from components.jobs_view import backend_panel
from components.session import current_model, load_dataset_cached, sidebar_selection
from core.data.tasks import list_tasks
from core.errors import LensError
from core.model.loading import MODEL_SLOT, describe_model

sel = sidebar_selection()

st.title("Perplexity Lens")
st.markdown(
    "Fine-tuning on ground-truth answers teaches a model the tokens it finds **surprising** "
    "(high perplexity), and that is what makes it forget other skills. Masking those tokens out "
    "of the loss (**Selective Token Masking**, STM) keeps the gain and avoids most of the "
    "forgetting. Perplexity Lens lets you see those tokens, tune the threshold, and train.\n\n"
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
        facts["parameters"] = f"{facts['parameters'] / 1e6:.1f} M"
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
    from core.jobs.registry import JobRegistry

    backend_panel(JobRegistry())

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
)
