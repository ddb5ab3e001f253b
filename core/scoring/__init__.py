"""Scoring: per-token perplexity of responses under a model, its cache, and dataset analytics."""
