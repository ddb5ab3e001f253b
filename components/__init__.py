"""Reusable view builders for the Streamlit pages.

Pure functions only (no Streamlit calls), so they are unit-tested directly:
- `core.viz.heatmap`: token perplexity heatmap as a self-contained HTML fragment.
- `core.viz.charts`: plotly figures for the paper's views, with `PLOTLY_CONFIG` for PNG export.
"""
