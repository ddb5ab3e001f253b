"""Perplexity Lens core library: models, data, scoring, masking, training, evaluation.

Plain Python; never imports Streamlit. Everything the app does goes through here, so the
CLI (`python -m core`) and the tests can do it too.
"""

__version__ = "0.1.0"
