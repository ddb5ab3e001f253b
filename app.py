"""Perplexity Lens: Streamlit entry point. Thin: page config, shared sidebar, navigation.

Paths are this file's folder's (the checkout, or the installed wheel's copy: `plens app`), never
the working folder's."""

from pathlib import Path

import streamlit as st

from components.layout import apply_layout

st.set_page_config(page_title="Perplexity Lens", page_icon=":material/search:", layout="wide")
apply_layout()

pages = [
    st.Page("pages/home.py", title="Start", icon=":material/home:", default=True),
    st.Page("pages/explore.py", title="Explore", icon=":material/local_fire_department:"),
    st.Page("pages/masking.py", title="Masking studio", icon=":material/filter_alt:"),
    st.Page("pages/generate.py", title="Generate data", icon=":material/auto_awesome:"),
    st.Page("pages/train.py", title="Train", icon=":material/model_training:"),
    st.Page("pages/runs.py", title="Runs", icon=":material/monitoring:"),
    st.Page("pages/drift.py", title="Where it forgot", icon=":material/troubleshoot:"),
    st.Page("pages/compare.py", title="Compare & report", icon=":material/compare_arrows:"),
    st.Page("pages/protocol.py", title="Reproduce the paper", icon=":material/science:"),
]
nav = st.navigation(pages)
st.logo(str(Path(__file__).parent / "docs" / "logo.svg"), size="large")
nav.run()
