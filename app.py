"""Perplexity Lens: Streamlit entry point. Thin: page config, shared sidebar, navigation."""

import streamlit as st

st.set_page_config(page_title="Perplexity Lens", page_icon=":material/search:", layout="wide")

pages = [
    st.Page("pages/home.py", title="Start", icon=":material/home:", default=True),
    st.Page("pages/explore.py", title="Explore", icon=":material/local_fire_department:"),
]
nav = st.navigation(pages)
st.logo("docs/logo.svg", size="large")
nav.run()
