"""Visualisation: pure chart and heatmap builders (plotly figures, HTML strings); no Streamlit."""
