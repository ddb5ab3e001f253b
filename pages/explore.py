"""Explore: scored examples and their token-perplexity heatmaps."""

import pandas as pd
import streamlit as st

from components.heatmap import render_token_heatmap
from components.session import scores_or_wait, sidebar_selection

sel = sidebar_selection()
st.title("Explore token perplexity")
st.caption(f"{sel.model} · {sel.data_label}")

run = scores_or_wait(sel)
if run is None:
    st.stop()
st.success(run.summary())
if not run.examples:
    st.warning("Nothing to show: every example was skipped.")
    st.stop()

tau = st.slider("Highlight threshold τ (token perplexity)", 1.0, 20.0, 2.5, 0.1)
rows = pd.DataFrame(
    [
        {
            "id": r.id,
            "seq ppl": r.seq_ppl,
            "tokens": r.n_response,
            "% > τ": 100 * float((r.ppl_array() > tau).mean()),
            "truncated": r.truncated,
        }
        for r in run.examples
    ]
)
st.dataframe(rows, hide_index=True, width="stretch", height=240)
ids = [r.id for r in run.examples]
chosen = st.selectbox(
    "Example",
    ids,
    index=ids.index(st.query_params.get("ex", ids[0])) if st.query_params.get("ex") in ids else 0,
)
st.query_params["ex"] = chosen
example = run.examples[ids.index(chosen)]
st.html(render_token_heatmap(example, tau=tau))
